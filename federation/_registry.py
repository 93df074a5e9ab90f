"""The project registry: research projects submitted by researchers, decided by the board.

Tables are SQLAlchemy Core, in :data:`metadata` (one module, so the Alembic migrations in
``deploy/migrations`` can include them). They live in the coordinator's database, next to
the privacy ledger (SQLite file in the state dir by default).

Life of a project: ``pending`` (submitted) → ``approved`` (the board signed a grant,
possibly with amended terms) or ``refused`` (with a reason). An approved project whose
grant has expired is reported as ``expired`` and gives no access any more. Every step is
an event (who, when, what), shown as the project's history.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
)

metadata = MetaData()
projects_table = Table(
    "bulle_projects",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("title", String(300), nullable=False),
    Column("purpose", Text, nullable=False),  # the finalité, as the board reads it
    Column("owner", String(200), nullable=False),
    Column("team", Text, nullable=False),  # JSON list of hub user names
    Column("datasets", Text, nullable=False),  # JSON list, as requested
    Column("epsilon", Double, nullable=False),  # requested
    Column("delta", Double, nullable=False),
    Column("duration_days", Integer, nullable=False),
    Column("status", String(20), nullable=False),  # pending | approved | refused
    Column("submitted_at", String(40), nullable=False),
    Column("decided_at", String(40), nullable=True),
    Column("decided_by", String(200), nullable=True),
    Column("reason", Text, nullable=True),
    # What the board granted (may differ from the request when amended).
    Column("granted_datasets", Text, nullable=True),
    Column("granted_epsilon", Double, nullable=True),
    Column("granted_delta", Double, nullable=True),
    Column("expires_at", String(40), nullable=True),
    Column("grant_token", Text, nullable=True),  # the board-signed grant the nodes verify
)
events_table = Table(
    "bulle_project_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(64), ForeignKey("bulle_projects.name"), nullable=False),
    Column("time", String(40), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(20), nullable=False),  # submitted | approved | amended | refused
    Column("detail", Text, nullable=False),  # JSON
    Index("ix_bulle_project_events_project", "project"),
)

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


class RegistryError(ValueError):
    """A request the registry refuses; ``status`` is the HTTP status the API answers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Project:
    name: str
    title: str
    purpose: str
    owner: str
    team: tuple[str, ...]
    datasets: tuple[str, ...]
    epsilon: float
    delta: float
    duration_days: int
    status: str
    submitted_at: str
    decided_at: str | None = None
    decided_by: str | None = None
    reason: str | None = None
    granted_datasets: tuple[str, ...] = ()
    granted_epsilon: float | None = None
    granted_delta: float | None = None
    expires_at: str | None = None
    grant_token: str | None = field(default=None, repr=False)

    @property
    def effective_status(self) -> str:
        """``expired`` once an approved project's grant has passed its date."""
        if self.status == "approved" and self.expires_at and \
                datetime.fromisoformat(self.expires_at) <= _now():
            return "expired"
        return self.status

    @property
    def active(self) -> bool:
        return self.effective_status == "approved"

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in (
            "name", "title", "purpose", "owner", "epsilon", "delta", "duration_days",
            "submitted_at", "decided_at", "decided_by", "reason", "granted_epsilon",
            "granted_delta", "expires_at")}
        out.update(team=list(self.team), datasets=list(self.datasets),
                   granted_datasets=list(self.granted_datasets), status=self.effective_status,
                   has_grant=self.grant_token is not None)
        return out


def _now() -> datetime:
    """The registry's clock (one place: tests move it instead of sleeping)."""
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


class Registry:
    """Projects and their events in one SQL database (``url``: SQLAlchemy URL or file)."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = f"sqlite:///{url}"
        self._engine = _engine(url)
        self._lock = threading.Lock()  # SQLite: one writer of ours at a time
        with self._engine.begin() as conn:
            metadata.create_all(conn)

    def close(self) -> None:
        self._engine.dispose()

    # -- reads --------------------------------------------------------------------------
    def get(self, name: str) -> Project | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(projects_table).where(
                projects_table.c.name == name)).first()
        return _project(row) if row else None

    def projects(self, status: str | None = None, member: str | None = None
                 ) -> list[Project]:
        """Projects, newest first; ``member``: only those whose team holds that user."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(projects_table).order_by(
                projects_table.c.submitted_at.desc(), projects_table.c.name)).all()
        out = [_project(r) for r in rows]
        if status is not None:
            out = [p for p in out if p.effective_status == status]
        if member is not None:
            out = [p for p in out if member in p.team]
        return out

    def events(self, project: str | None = None) -> list[dict[str, Any]]:
        q = select(events_table).order_by(events_table.c.id)
        if project is not None:
            q = q.where(events_table.c.project == project)
        with self._engine.connect() as conn:
            rows = conn.execute(q).all()
        return [{"project": r.project, "time": r.time, "actor": r.actor, "action": r.action,
                 "detail": json.loads(r.detail)} for r in rows]

    def active_grant(self, project: str) -> str | None:
        p = self.get(project)
        return p.grant_token if p is not None and p.active else None

    # -- writes -------------------------------------------------------------------------
    def submit(self, owner: str, *, name: str, title: str, purpose: str,
               datasets: list[str], epsilon: float, delta: float, duration_days: int,
               team: list[str]) -> Project:
        if not _NAME.match(name):
            raise RegistryError("project name: 2-63 characters among a-z, 0-9 and '-'")
        if not title.strip() or not purpose.strip():
            raise RegistryError("title and purpose are required")
        if not datasets:
            raise RegistryError("name at least one dataset")
        team = sorted({owner, *team})
        now = _iso(_now())
        with self._lock, self._engine.begin() as conn:
            if conn.execute(select(projects_table.c.name).where(
                    projects_table.c.name == name)).first():
                raise RegistryError(f"a project named {name!r} exists", status=409)
            conn.execute(projects_table.insert().values(
                name=name, title=title.strip(), purpose=purpose.strip(), owner=owner,
                team=json.dumps(team), datasets=json.dumps(sorted(set(datasets))),
                epsilon=float(epsilon), delta=float(delta), duration_days=int(duration_days),
                status="pending", submitted_at=now))
            self._event(conn, name, owner, "submitted",
                        {"epsilon": epsilon, "datasets": sorted(set(datasets))})
        p = self.get(name)
        assert p is not None
        return p

    def approve(self, name: str, actor: str, *, token: str, datasets: tuple[str, ...],
                epsilon: float, delta: float, expires: datetime, reason: str = "",
                amended: bool = False) -> Project:
        """Record the board's grant (already signed) as the project's terms."""
        with self._lock, self._engine.begin() as conn:
            p = self._decidable(conn, name, allow_approved=True)
            conn.execute(projects_table.update().where(projects_table.c.name == name).values(
                status="approved", decided_at=_iso(_now()), decided_by=actor,
                reason=reason or None, granted_datasets=json.dumps(list(datasets)),
                granted_epsilon=float(epsilon), granted_delta=float(delta),
                expires_at=_iso(expires), grant_token=token))
            action = "amended" if amended or p.status == "approved" else "approved"
            self._event(conn, name, actor, action, {
                "epsilon": epsilon, "delta": delta, "datasets": list(datasets),
                "expires": _iso(expires), "reason": reason})
        out = self.get(name)
        assert out is not None
        return out

    def refuse(self, name: str, actor: str, reason: str) -> Project:
        if not reason.strip():
            raise RegistryError("a refusal needs a reason")
        with self._lock, self._engine.begin() as conn:
            self._decidable(conn, name, allow_approved=False)
            conn.execute(projects_table.update().where(projects_table.c.name == name).values(
                status="refused", decided_at=_iso(_now()), decided_by=actor,
                reason=reason.strip()))
            self._event(conn, name, actor, "refused", {"reason": reason.strip()})
        out = self.get(name)
        assert out is not None
        return out

    @staticmethod
    def default_expiry(p: Project) -> datetime:
        return _now() + timedelta(days=p.duration_days)

    # -- internals ----------------------------------------------------------------------
    def _decidable(self, conn: Any, name: str, allow_approved: bool) -> Project:
        row = conn.execute(select(projects_table).where(projects_table.c.name == name)).first()
        if row is None:
            raise RegistryError(f"no project {name!r}", status=404)
        p = _project(row)
        if p.status == "pending" or (allow_approved and p.status == "approved"):
            return p
        raise RegistryError(f"project {name!r} is {p.effective_status}: nothing to decide",
                            status=409)

    @staticmethod
    def _event(conn: Any, project: str, actor: str, action: str,
               detail: dict[str, Any]) -> None:
        conn.execute(events_table.insert().values(
            project=project, time=_iso(_now()), actor=actor, action=action,
            detail=json.dumps(detail, sort_keys=True)))


def _project(r: Any) -> Project:
    return Project(
        name=r.name, title=r.title, purpose=r.purpose, owner=r.owner,
        team=tuple(json.loads(r.team)), datasets=tuple(json.loads(r.datasets)),
        epsilon=r.epsilon, delta=r.delta, duration_days=r.duration_days, status=r.status,
        submitted_at=r.submitted_at, decided_at=r.decided_at, decided_by=r.decided_by,
        reason=r.reason,
        granted_datasets=tuple(json.loads(r.granted_datasets)) if r.granted_datasets else (),
        granted_epsilon=r.granted_epsilon, granted_delta=r.granted_delta,
        expires_at=r.expires_at, grant_token=r.grant_token)


def _engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")  # the ledger writes the same file
        cur.execute("PRAGMA journal_mode = WAL")
        cur.close()

    return engine
