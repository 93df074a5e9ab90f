"""The privacy ledger: budgets and atomic, idempotent charges (SQLAlchemy Core).

One transaction per charge: lock the budget rows, read their running RDP totals, check the
new total against the cap at the budget's δ, write the charge and the new totals, commit.
Locking: ``BEGIN IMMEDIATE`` on SQLite (one writer at a time, across threads and processes;
WAL + ``synchronous=FULL`` so a returned charge survives a crash) and
``SELECT … FOR UPDATE`` on the budget rows elsewhere (PostgreSQL).

Scopes: a budget is keyed by (project, scope) where scope is a dataset name or ``"*"``
for the whole project. A charge on (project, dataset) is checked against, and written to,
every budget that exists among (project, dataset) and (project, "*"); it is refused if
any of them would overflow, or if none exists.

Idempotency: ``request_id`` identifies a *decision*. Accepted and refused charges are both
recorded, and a replay returns the recorded result with ``replay=True`` and charges
nothing. Reusing a request_id for a different charge raises ``LedgerError``.

Create a ``Ledger`` in the process that uses it (after any fork).
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import (
    Boolean,
    Column,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    import dp_accounting as dpa

from privacy._accounting import ORDERS, RdpTotals, event_key, rdp_of_key

PROJECT_WIDE = "*"

metadata = MetaData()
budgets = Table(
    "privacy_budgets",
    metadata,
    Column("project", String(200), primary_key=True),
    Column("scope", String(200), primary_key=True),
    Column("epsilon_cap", Double, nullable=False),
    Column("delta", Double, nullable=False),
    Column("rdp", Text, nullable=False),  # JSON list of running RDP sums at ORDERS
    Column("n_orders", Integer, nullable=False),
    Column("spent_epsilon", Double, nullable=False),  # ε of ``rdp`` at ``delta`` (cached)
    Column("n_charges", Integer, nullable=False, default=0),
    Column("updated_at", String(40), nullable=False),
)
charges = Table(
    "privacy_charges",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(200), nullable=False, unique=True),
    Column("project", String(200), nullable=False),
    Column("scope", String(200), nullable=False),
    Column("event", Text, nullable=False),  # canonical JSON of the dp-accounting event
    Column("epsilon_claim", Double, nullable=True),
    Column("accepted", Boolean, nullable=False),
    Column("spent_epsilon", Double, nullable=False),
    Column("remaining_epsilon", Double, nullable=False),
    Column("needed_epsilon", Double, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
    Index("ix_privacy_charges_project_scope", "project", "scope"),
)


# Statements of the charge path, built once (building them per call costs ~0.5 ms).
_SEL_BUDGETS = (
    select(budgets)
    .where(budgets.c.project == bindparam("p"), budgets.c.scope.in_([bindparam("s1"),
                                                                   bindparam("s2")]))
    .order_by(budgets.c.scope)
    .with_for_update()  # row locks on PostgreSQL; SQLite relies on BEGIN IMMEDIATE
)  # fmt: skip
_SEL_CHARGE = select(charges).where(charges.c.request_id == bindparam("rid"))
_UPD_TOTALS = (
    budgets.update()
    .where(budgets.c.project == bindparam("p"), budgets.c.scope == bindparam("s"))
    .values(
        rdp=bindparam("rdp_"),
        spent_epsilon=bindparam("spent_"),
        n_charges=budgets.c.n_charges + 1,
        updated_at=bindparam("now_"),
    )
)
_INS_CHARGE = charges.insert()


class LedgerError(Exception):
    """Misuse of the ledger (unknown budget arguments, request_id reused, …)."""


@dataclass(frozen=True)
class ChargeResult:
    """Outcome of a charge, reported for the binding budget (least ε left).

    ``spent_epsilon``/``remaining_epsilon``: after the charge if accepted, before it if
    refused. ``needed_epsilon``: how much ε this charge adds at the budget's δ (RDP is
    not additive in ε, so this depends on what was spent before).
    """

    accepted: bool
    spent_epsilon: float
    remaining_epsilon: float
    needed_epsilon: float
    replay: bool
    reason: str = ""
    scope: str = ""


@dataclass(frozen=True)
class ChargeRecord:
    """One row of ``history``; ``epsilon_claim`` is the caller's nominal ε, kept for audit
    (gating always uses the RDP of ``event``)."""

    request_id: str
    project: str
    scope: str
    event: dict[str, Any]
    epsilon_claim: float | None
    accepted: bool
    spent_epsilon: float
    remaining_epsilon: float
    needed_epsilon: float
    reason: str
    created_at: str


class Ledger:
    """Budgets and charges in one database (``url``: SQLAlchemy URL or SQLite file path)."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = f"sqlite:///{url}"
        self.url = url
        self._engine = _make_engine(url)
        with self._engine.begin() as conn:  # serialised on SQLite by BEGIN IMMEDIATE
            if conn.dialect.name == "postgresql":  # …and here, so racing creators are safe
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7261946205)")
            metadata.create_all(conn)

    def close(self) -> None:
        self._engine.dispose()

    def size(self) -> tuple[int, int]:
        """(budgets, charges) rows: what an operator watches grow (metrics)."""
        with self._read() as conn:
            return (int(conn.execute(select(func.count()).select_from(budgets)).scalar_one()),
                    int(conn.execute(select(func.count()).select_from(charges)).scalar_one()))

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction: plain (deferred) BEGIN on SQLite, no write lock."""
        with self._engine.connect() as conn:
            conn.execution_options(bulle_read_only=True)
            yield conn

    # -------------------------------------------------------------------------- budgets

    def set_budget(self, project: str, scope: str, epsilon: float, delta: float) -> None:
        """Create or change the cap of (project, scope); spent totals are kept."""
        _check_key(project, scope)
        if not (epsilon >= 0 and math.isfinite(epsilon)):
            raise LedgerError(f"epsilon cap must be finite and >= 0, got {epsilon}")
        if not 0 < delta < 1:
            raise LedgerError(f"delta must be in (0, 1) for RDP accounting, got {delta}")
        with self._engine.begin() as conn:
            row = conn.execute(
                select(budgets)
                .where(budgets.c.project == project, budgets.c.scope == scope)
                .with_for_update()
            ).first()
            now = _now()
            if row is None:
                conn.execute(
                    budgets.insert().values(
                        project=project,
                        scope=scope,
                        epsilon_cap=float(epsilon),
                        delta=float(delta),
                        rdp=json.dumps(RdpTotals().to_list()),
                        n_orders=len(ORDERS),
                        spent_epsilon=0.0,
                        n_charges=0,
                        updated_at=now,
                    )
                )
            else:
                conn.execute(
                    budgets.update()
                    .where(budgets.c.project == project, budgets.c.scope == scope)
                    .values(
                        epsilon_cap=float(epsilon),
                        delta=float(delta),
                        spent_epsilon=_totals(row).epsilon(delta),  # δ may have changed
                        updated_at=now,
                    )
                )

    def spent(self, project: str, scope: str) -> tuple[float, float]:
        """(ε spent at the budget's δ, that δ) for one budget."""
        with self._read() as conn:
            row = conn.execute(
                select(budgets).where(budgets.c.project == project, budgets.c.scope == scope)
            ).first()
        if row is None:
            raise LedgerError(f"no budget for ({project!r}, {scope!r})")
        return float(row.spent_epsilon), float(row.delta)

    def history(self, project: str, scope: str) -> list[ChargeRecord]:
        """Charges recorded for (project, scope), oldest first (refusals included)."""
        with self._read() as conn:
            rows = conn.execute(
                select(charges)
                .where(charges.c.project == project, charges.c.scope == scope)
                .order_by(charges.c.id)
            ).all()
        return [
            ChargeRecord(
                r.request_id, r.project, r.scope, json.loads(r.event), r.epsilon_claim,
                bool(r.accepted), r.spent_epsilon, r.remaining_epsilon, r.needed_epsilon,
                r.reason, r.created_at,
            )
            for r in rows
        ]  # fmt: skip

    # --------------------------------------------------------------------------- charge

    def charge(
        self,
        request_id: str,
        project: str,
        scope: str,
        event: dpa.DpEvent,
        epsilon_claim: float | None = None,
    ) -> ChargeResult:
        """Atomically check and record one charge (see the module docstring)."""
        _check_key(project, scope)
        if not request_id:
            raise LedgerError("request_id is required")
        key = event_key(event)
        vec = rdp_of_key(key)  # outside the transaction: may be slow once, then cached
        try:
            with self._engine.begin() as conn:
                return self._charge_tx(conn, request_id, project, scope, key, vec, epsilon_claim)
        except IntegrityError:
            # Another transaction recorded this request_id first (possible only where no
            # budget row was locked): return its result.
            with self._read() as conn:
                found = self._replay(conn, request_id, project, scope, key)
            if found is None:
                raise
            return found

    def _charge_tx(
        self,
        conn: Connection,
        request_id: str,
        project: str,
        scope: str,
        key: str,
        vec: np.ndarray,
        claim: float | None,
    ) -> ChargeResult:
        rows = conn.execute(_SEL_BUDGETS, {"p": project, "s1": scope, "s2": PROJECT_WIDE}).all()
        # Checked after locking, so a concurrent twin on PostgreSQL sees the first's row.
        prior = self._replay(conn, request_id, project, scope, key)
        if prior is not None:
            return prior
        if not rows:
            why = f"no budget for ({project}, {scope})"
            res = ChargeResult(False, 0.0, 0.0, 0.0, False, why, scope)
            self._record(conn, request_id, project, scope, key, claim, res)
            return res

        checks = []  # (scope, spent_before, spent_after, cap, new_totals)
        for row in rows:
            after = _totals(row).plus_rdp(vec)
            checks.append(
                (row.scope, float(row.spent_epsilon), after.epsilon(row.delta),
                 float(row.epsilon_cap), after)
            )  # fmt: skip
        over = [c for c in checks if c[2] > c[3]]
        if over:
            s, before_eps, after_eps, cap, _ = min(over, key=lambda c: c[3] - c[2])
            res = ChargeResult(
                False, before_eps, cap - before_eps, after_eps - before_eps, False,
                f"over budget ({project}, {s}): needs {after_eps - before_eps:.6g} ε, "
                f"{cap - before_eps:.6g} left of {cap:.6g}",
                s,
            )  # fmt: skip
        else:
            now = _now()
            for s, _b, after_eps, _c, after in checks:
                conn.execute(
                    _UPD_TOTALS,
                    {"p": project, "s": s, "rdp_": _dump(after),
                     "spent_": after_eps, "now_": now},
                )  # fmt: skip
            s, before_eps, after_eps, cap, _ = min(checks, key=lambda c: c[3] - c[2])
            res = ChargeResult(
                True, after_eps, cap - after_eps, after_eps - before_eps, False, "", s
            )
        self._record(conn, request_id, project, scope, key, claim, res)
        return res

    @staticmethod
    def _replay(
        conn: Connection, request_id: str, project: str, scope: str, key: str
    ) -> ChargeResult | None:
        r = conn.execute(_SEL_CHARGE, {"rid": request_id}).first()
        if r is None:
            return None
        if (r.project, r.scope, r.event) != (project, scope, key):
            raise LedgerError(f"request_id {request_id!r} was already used for another charge")
        return ChargeResult(
            bool(r.accepted), r.spent_epsilon, r.remaining_epsilon, r.needed_epsilon, True,
            r.reason, r.scope,
        )  # fmt: skip

    @staticmethod
    def _record(
        conn: Connection,
        request_id: str,
        project: str,
        scope: str,
        key: str,
        claim: float | None,
        res: ChargeResult,
    ) -> None:
        conn.execute(
            _INS_CHARGE,
            dict(
                request_id=request_id,
                project=project,
                scope=scope,
                event=key,
                epsilon_claim=None if claim is None else float(claim),
                accepted=res.accepted,
                spent_epsilon=res.spent_epsilon,
                remaining_epsilon=res.remaining_epsilon,
                needed_epsilon=res.needed_epsilon,
                reason=res.reason,
                created_at=_now(),
            ),
        )


# ---------------------------------------------------------------------------- internals


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module so we can emit BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")  # fsync the WAL on every commit
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front: no read-then-upgrade deadlock between charges.
        read_only = conn.get_execution_options().get("bulle_read_only", False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


# Parsed totals by their stored text: a charge reads back what the previous one wrote,
# so the JSON of 150-odd floats is rarely parsed twice (it is a large share of a charge).
_PARSED: OrderedDict[str, RdpTotals] = OrderedDict()
_PARSED_LOCK = threading.Lock()


def _totals(row: Any) -> RdpTotals:
    if row.n_orders != len(ORDERS):
        raise LedgerError("stored RDP totals use another list of orders")
    text = row.rdp
    with _PARSED_LOCK:
        hit = _PARSED.get(text)
    if hit is None:
        hit = RdpTotals.from_list(json.loads(text))
        _remember(text, hit)
    return hit


def _remember(text: str, totals: RdpTotals) -> None:
    with _PARSED_LOCK:
        _PARSED[text] = totals
        _PARSED.move_to_end(text)
        while len(_PARSED) > 256:
            _PARSED.popitem(last=False)


def _dump(totals: RdpTotals) -> str:
    """The totals as JSON (as ``json.dumps`` writes them), several times faster."""
    values = totals.to_list()
    if not all(map(math.isfinite, values)):
        return json.dumps(values)  # Infinity/NaN spelled the json way
    text = "[" + ", ".join(map(float.__repr__, values)) + "]"
    _remember(text, totals)
    return text


def _check_key(project: str, scope: str) -> None:
    if not project or not scope:
        raise LedgerError("project and scope must be non-empty")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
