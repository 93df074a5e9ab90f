"""Standing indicators (issue 17): a researcher proposes a query to be refreshed on a
schedule; the ethics board approves it like a project; the coordinator runs it and keeps
its history for the ``observer`` role (State and local-authority staff) to read.

- An indicator *is* a registry project (``indicator-<name>``): the board decides it with
  the same flow, grant and audit as any project, and its ε budget is that project's grant.
  Its team is one runner identity (``indicator:<name>``), not the proposer: nobody can
  spend an indicator's budget with ad-hoc queries.
- A refresh goes through :meth:`Coordinator.submit`, the ordinary query path: parsed,
  checked, planned, charged at the coordinator and at every node, audited, released with
  the same disclosure control. No side door, so nothing an ordinary query could not
  release is ever stored here.
- Every refresh is a row of ``bulle_indicator_refreshes`` (migration 0004), released,
  refused (budget spent, grant expired, static refusal) or failed: a refresh that did not
  release is recorded and shown, never skipped silently.
- The scheduler is a thread ticking every ``poll_s``; *when* is decided by ``clock`` (an
  injectable ``() -> datetime``), so tests move time instead of sleeping and call
  :meth:`Indicators.tick` themselves.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Double, Index, Integer, String, Table, Text, select

from federation import _checks as checks
from federation import _dp_rules as dp_rules
from federation._config import Researcher
from federation._errors import QueryError
from federation._registry import Project, Registry, RegistryError, _engine, metadata
from federation._sql import parse
from privacy import AuditLog

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

log = logging.getLogger("bulle.indicators")

PROJECT_PREFIX = "indicator-"  # the registry project that carries an indicator's grant
RUNNER_PREFIX = "indicator:"  # the identity its refreshes run as (no hub name has ':')
SCHEDULES = {"hourly": 3600, "daily": 86_400, "weekly": 604_800}
MIN_INTERVAL_S = 1  # tests refresh every few (fake) seconds; production uses the names
# A grant carries ε > 0; an indicator on restricted or open tables is never charged (the
# cell key method, not ε, protects it), so its project asks for this nominal amount.
NOMINAL_EPSILON = 1e-6
RECEIPT_KEY = "receipt"  # where a released result carries its signed receipt (issue 17.3)
REFRESH_WAIT_S = 600.0
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,50}$")

indicators_table = Table(
    "bulle_indicators",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("title", String(300), nullable=False),
    Column("description", Text, nullable=False),
    Column("sql", Text, nullable=False),
    Column("schedule", String(20), nullable=False),  # hourly | daily | weekly | <n>s
    Column("interval_s", Integer, nullable=False),
    Column("epsilon", Double, nullable=True),  # per refresh; None: not a DP indicator
    Column("tier", String(20), nullable=False),
    Column("audience", Text, nullable=False),  # who it is for, as the board reads it
    Column("value_column", String(200), nullable=True),  # charted; default: the last one
    Column("project", String(64), nullable=False),
    Column("proposer", String(200), nullable=False),
    Column("proposed_at", String(40), nullable=False),
)
refreshes_table = Table(
    "bulle_indicator_refreshes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("indicator", String(64), nullable=False),
    Column("started_at", String(40), nullable=False),  # the scheduler's clock
    Column("finished_at", String(40), nullable=True),
    Column("status", String(20), nullable=False),  # running | released | refused | failed
    Column("query_id", String(64), nullable=True),  # the release's id (links its receipt)
    Column("epsilon_charged", Double, nullable=False),
    Column("result", Text, nullable=True),  # the released table (JSON), as a researcher gets it
    Column("error_code", String(40), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("receipt", Text, nullable=True),  # JSON: the release's signed receipt, when any
    Index("ix_bulle_indicator_refreshes_indicator", "indicator", "id"),
)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def interval_of(schedule: str | int) -> tuple[str, int]:
    """(label, seconds) of a schedule: ``hourly``, ``daily``, ``weekly`` or seconds."""
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return schedule, SCHEDULES[schedule]
    try:
        seconds = int(str(schedule).removesuffix("s"))
    except ValueError:
        raise RegistryError(f"schedule {schedule!r}: hourly, daily, weekly or a number of "
                            "seconds") from None
    if seconds < MIN_INTERVAL_S:
        raise RegistryError(f"schedule: at least {MIN_INTERVAL_S} s between refreshes")
    return f"{seconds}s", seconds


def receipt_of(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The hook where a refresh's receipt is taken from its release (issue 17 part 3 adds
    one to every released result under :data:`RECEIPT_KEY`); None until it exists."""
    receipt = (result or {}).get(RECEIPT_KEY)
    return receipt if isinstance(receipt, dict) else None


@dataclass(frozen=True)
class IndicatorSpec:
    """What a researcher proposes."""

    name: str
    title: str
    sql: str
    schedule: str | int
    audience: str
    description: str = ""
    epsilon: float | None = None  # per refresh (sensitive tables); None otherwise
    refreshes: int = 12  # how many refreshes the requested budget should cover
    epsilon_budget: float | None = None  # instead of ε × nodes × refreshes
    value_column: str | None = None
    duration_days: int = 365


@dataclass(frozen=True)
class Indicator:
    name: str
    title: str
    description: str
    sql: str
    schedule: str
    interval_s: int
    epsilon: float | None
    tier: str
    audience: str
    value_column: str | None
    project: str
    proposer: str
    proposed_at: str
    status: str = "pending"  # the project's: pending | approved | refused | expired

    @property
    def runner(self) -> str:
        return RUNNER_PREFIX + self.name

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Refresh:
    id: int
    indicator: str
    started_at: str
    finished_at: str | None
    status: str
    query_id: str | None
    epsilon_charged: float
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    receipt: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def purpose_text(spec: IndicatorSpec, proposer: str, tier: str, interval: str) -> str:
    """What the board reads in the project's purpose: the indicator's terms in full."""
    cost = (f"ε={spec.epsilon:g} per refresh per node" if spec.epsilon is not None else
            f"no ε: {tier} tier (released as any {tier} query is)")
    return (f"Standing indicator proposed by {proposer}: {spec.title}. "
            f"{spec.description.strip()} Refreshed {interval}; {cost}. Audience: "
            f"{spec.audience}. Published read-only to observers. SQL: {spec.sql.strip()}")


class Indicators:
    """The indicators of one coordinator: proposals, history, the refresh scheduler."""

    def __init__(self, coordinator: Coordinator,
                 clock: Callable[[], datetime] = utc_now, poll_s: float = 5.0) -> None:
        self.coordinator = coordinator
        self.clock = clock
        self.poll_s = poll_s
        self._engine = _engine(_url(coordinator.config.database))
        with self._engine.begin() as conn:
            metadata.create_all(conn, tables=[indicators_table, refreshes_table])
        self._tick_lock = threading.Lock()  # one tick at a time: a refresh never runs twice
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the scheduler -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self.interrupted()  # the only scheduler of this database: none is running
            self._thread = threading.Thread(target=self._loop, name="bulle-indicators",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._engine.dispose()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:  # the next tick tries again; the error is in the log
                log.exception("indicator tick failed")

    def tick(self) -> list[Refresh]:
        """Refresh every approved indicator that is due at ``clock()``; the refreshes run."""
        out = []
        with self._tick_lock:
            for ind in self.indicators():
                if self._stop.is_set():
                    break
                if ind.status == "approved" and self._due(ind):
                    out.append(self.refresh(ind))
        return out

    def _due(self, ind: Indicator) -> bool:
        last = self.history(ind.name, limit=1)
        if not last:
            return True  # the first refresh runs as soon as the board approved it
        started = datetime.fromisoformat(last[-1].started_at)
        return self.clock() >= started + timedelta(seconds=ind.interval_s)

    def refresh(self, ind: Indicator) -> Refresh:
        """One refresh through the ordinary query path, recorded whatever its outcome: the
        row is written (``running``) before the query is submitted, so a refresh cut short
        by a crash still shows, as ``interrupted`` (see :meth:`start`)."""
        runner = Researcher(ind.runner, "", (ind.project,))
        with self._engine.begin() as conn:
            rid = conn.execute(refreshes_table.insert().values(
                indicator=ind.name, started_at=_iso(self.clock()), status="running",
                epsilon_charged=0.0)).inserted_primary_key[0]
        row: dict[str, Any] = {}
        try:
            record = self.coordinator.submit(ind.sql, runner, ind.project, ind.epsilon)
        except QueryError as e:  # refused before it started (e.g. no longer a member)
            row.update(status="refused", error_code=e.code, error_message=e.message[:2000])
        else:
            self._update(rid, query_id=record.id)  # linkable as soon as it exists
            self._wait(record.done)
            row.update(epsilon_charged=record.epsilon_charged)
            if record.status == "done" and record.result is not None:
                row.update(status="released", result=json.dumps(record.result, default=str),
                           receipt=_json_or_none(receipt_of(record.result)))
            else:
                err = record.error or {"code": "timeout", "message": "no answer in time"}
                status = "refused" if int(err.get("status", 500)) in (400, 403) else "failed"
                row.update(status=status, error_code=str(err.get("code")),
                           error_message=str(err.get("message", ""))[:2000])
        self._update(rid, finished_at=_iso(self.clock()), **row)
        log.info("indicator %s refreshed: %s", ind.name, row["status"])
        return self._refresh(rid)

    def _update(self, rid: int, **values: Any) -> None:
        with self._engine.begin() as conn:
            conn.execute(refreshes_table.update().where(refreshes_table.c.id == rid)
                         .values(**values))

    def interrupted(self) -> int:
        """Refreshes a previous run left ``running`` (it stopped or crashed meanwhile):
        marked ``failed``/``interrupted``, shown like any failure; their charge stands."""
        with self._engine.begin() as conn:
            return conn.execute(refreshes_table.update().where(
                refreshes_table.c.status == "running").values(
                status="failed", error_code="interrupted", finished_at=_iso(self.clock()),
                error_message="the coordinator stopped during this refresh; whatever was "
                              "charged stays charged")).rowcount

    def _wait(self, done: threading.Event) -> None:
        """Until the query ends, the scheduler stops (the coordinator closes) or
        :data:`REFRESH_WAIT_S` passes; an unfinished query is recorded as failed."""
        for _ in range(int(REFRESH_WAIT_S / 0.5)):
            if done.wait(0.5) or self._stop.is_set():
                return

    # -- proposals -----------------------------------------------------------------------
    def propose(self, proposer: str, spec: IndicatorSpec) -> Indicator:
        """Check the SQL like a query (free: nothing runs), then submit the indicator's
        project for the board to decide."""
        if not _NAME.match(spec.name):
            raise RegistryError("indicator name: 2-51 characters among a-z, 0-9 and '-'")
        label, seconds = interval_of(spec.schedule)
        catalog = self.coordinator.catalog()
        try:
            query = parse(spec.sql, {n: t.columns for n, t in catalog.items()})
            checked = checks.check(query, catalog)
            if checked.tier == "sensitive":
                dp_rules.check(query, catalog)  # the shape refusals every refresh would get
        except QueryError as e:
            raise RegistryError(f"the indicator's SQL is refused: {e.message}") from None
        tier, tables = checked.tier, sorted({t.name for t in checked.tables})
        if tier == "sensitive" and spec.epsilon is None:
            raise RegistryError("sensitive tables: give the ε of each refresh (epsilon=…)")
        if tier != "sensitive" and spec.epsilon is not None:
            raise RegistryError(f"{tier} tables are not charged in ε: leave epsilon out")
        if spec.value_column is not None and spec.value_column not in query_columns(query):
            raise RegistryError(f"value_column {spec.value_column!r} is not an output column")
        nodes = len(checked.participants[0])
        return register(self.coordinator.projects.registry, self.coordinator.projects.audit,
                        self._engine, proposer, spec, tier, tables, nodes, (label, seconds))

    # -- reads ---------------------------------------------------------------------------
    def indicators(self) -> list[Indicator]:
        registry = self.coordinator.projects.registry
        with self._engine.connect() as conn:
            rows = conn.execute(select(indicators_table).order_by(
                indicators_table.c.name)).all()
        return [_indicator(r, registry.get(r.project)) for r in rows]

    def get(self, name: str) -> Indicator | None:
        with self._engine.connect() as conn:
            r = conn.execute(select(indicators_table).where(
                indicators_table.c.name == name)).first()
        return _indicator(r, self.coordinator.projects.registry.get(r.project)) if r else None

    def history(self, name: str, limit: int | None = None) -> list[Refresh]:
        """Refreshes of ``name``, oldest first (the latest ``limit`` ones)."""
        q = select(refreshes_table).where(refreshes_table.c.indicator == name) \
            .order_by(refreshes_table.c.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._engine.connect() as conn:
            rows = conn.execute(q).all()
        return [_refresh_of(r) for r in reversed(rows)]

    def _refresh(self, rid: int) -> Refresh:
        with self._engine.connect() as conn:
            r = conn.execute(select(refreshes_table).where(refreshes_table.c.id == rid)).one()
        return _refresh_of(r)


def query_columns(query: Any) -> list[str]:
    """The output column names of a parsed query."""
    return [item.name for item in query.items]


def register(registry: Registry, audit: AuditLog, engine: Any, proposer: str,
             spec: IndicatorSpec, tier: str, tables: list[str], nodes: int,
             interval: tuple[str, int]) -> Indicator:
    """Submit the indicator's project (pending) and record the indicator."""
    label, seconds = interval
    project = PROJECT_PREFIX + spec.name
    if spec.epsilon is None:
        budget = NOMINAL_EPSILON
    else:  # each refresh is charged ε per answering node (nodes not declared disjoint)
        budget = spec.epsilon_budget or spec.epsilon * max(nodes, 1) * max(spec.refreshes, 1)
    registry.submit(RUNNER_PREFIX + spec.name, name=project,
                    title=f"Indicator: {spec.title}"[:300],
                    purpose=purpose_text(spec, proposer, tier, label), datasets=tables,
                    epsilon=budget, delta=1e-6, duration_days=spec.duration_days, team=[])
    values = {"name": spec.name, "title": spec.title[:300], "description": spec.description,
              "sql": spec.sql, "schedule": label, "interval_s": seconds,
              "epsilon": spec.epsilon, "tier": tier, "audience": spec.audience,
              "value_column": spec.value_column, "project": project,
              "proposer": proposer, "proposed_at": _iso(utc_now())}
    with engine.begin() as conn:
        conn.execute(indicators_table.insert().values(**values))
    audit.append(proposer, project, "indicator_proposed", {
        "indicator": spec.name, "schedule": label, "epsilon": spec.epsilon, "tier": tier,
        "datasets": tables, "epsilon_budget": budget})
    return _indicator(values, registry.get(project))


def _url(database: str) -> str:
    return database if "://" in database else f"sqlite:///{database}"


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _indicator(r: Any, project: Project | None) -> Indicator:
    get = r.get if isinstance(r, dict) else r._mapping.get
    return Indicator(
        name=get("name"), title=get("title"), description=get("description"), sql=get("sql"),
        schedule=get("schedule"), interval_s=get("interval_s"), epsilon=get("epsilon"),
        tier=get("tier"), audience=get("audience"), value_column=get("value_column"),
        project=get("project"), proposer=get("proposer"), proposed_at=get("proposed_at"),
        status=project.effective_status if project is not None else "unknown")


def _refresh_of(r: Any) -> Refresh:
    return Refresh(
        id=r.id, indicator=r.indicator, started_at=r.started_at, finished_at=r.finished_at,
        status=r.status, query_id=r.query_id, epsilon_charged=float(r.epsilon_charged or 0),
        result=json.loads(r.result) if r.result else None, error_code=r.error_code,
        error_message=r.error_message,
        receipt=json.loads(r.receipt) if r.receipt else None)
