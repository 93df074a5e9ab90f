"""Disclosure control at the node: what a plan's computed table becomes before it leaves.

- ``open`` tier: released as computed (a row plan's rows, up to the node's cap);
- ``restricted`` tier: the cell key method (``_restricted.release_restricted``): every
  count and magnitude perturbed, cells under the threshold released as "< k";
- ``sensitive`` tier: differential privacy (``_dp.release``), charged to the node's ledger
  when the plan is accepted, before it runs (``release_dp``): a failure keeps its charge
  and a replay of the request gets the same result or the same failure.

Also what this needs to know of a table, computed once at load before the lock-down: the
static envelopes of numeric columns (``envelopes``) and the most rows one unit has
(``max_unit_rows``). Whatever fails after a plan was accepted is one public outcome,
:data:`FAILED` (:class:`PlanFailed`): how it failed may depend on one person's data.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from federation.proto import bulle_pb2 as pb
from nodes._compile import CompiledPlan, PlanRefused
from nodes._config import ROW_UNIT, DatasetConfig
from nodes._dp import release
from nodes._guard import PrivacyGuard
from nodes._references import to_ipc
from nodes._restricted import envelope, release_restricted
from nodes._sources import _quote, type_family
from privacy import ptable_for


@dataclass(frozen=True)
class Execution:
    result: pb.PartialResult
    rows_out: int
    seconds: float


# The one public outcome of any failure after a node accepted a plan: whether evaluation
# fails, and how, may depend on one person's data (DESIGN.md, "Total evaluation").
FAILED = "the plan could not be evaluated"


class PlanFailed(RuntimeError):
    """A plan the node accepted did not complete. The caller always gets :data:`FAILED`
    (``public`` is what a replay of a charged plan repeats, never more); ``cause`` (the
    exception, which may quote data) and ``incident`` go to this node's log and audit."""

    def __init__(self, public: str = FAILED, incident: str = "", *, cause: str = "",
                 interrupted: str = "") -> None:
        super().__init__(FAILED)
        self.public = public
        self.incident = incident or uuid.uuid4().hex[:12]
        self.cause = cause
        self.interrupted = interrupted  # "deadline" or "cancelled": DuckDB was interrupted


def release_table(table: pa.Table, compiled: CompiledPlan, node_id: str, max_rows: int
                  ) -> tuple[pb.PartialResult, int]:
    """An open or restricted plan's table as the partial result that leaves the node, and
    its number of rows."""
    if compiled.is_rows:
        if table.num_rows > max_rows:
            raise PlanRefused(f"more than {max_rows} rows: add a filter or a LIMIT")
        out, suppressed = table, 0
    elif compiled.restricted is not None:
        params = compiled.restricted
        out, suppressed = release_restricted(table, params, ptable_for(params.params))
    else:  # open data: released as computed
        out = table.append_column("__suppressed", pa.array([False] * table.num_rows))
        suppressed = 0
    result = pb.PartialResult(
        node_id=node_id, arrow_ipc=to_ipc(out), suppressed_cells=suppressed, hidden_cells=0,
        tier=compiled.tier, min_count=compiled.min_count, round_to=compiled.round_to,
        perturbed=compiled.restricted is not None and compiled.restricted.perturb,
    )
    return result, out.num_rows


def release_dp(guard: PrivacyGuard, plan: pb.Plan, compiled: CompiledPlan, node_id: str,
               run: Callable[[], pa.Table], failed: Callable[[Exception], PlanFailed],
               started: float) -> Execution:
    """A sensitive plan: admitted by the guard (grant, policy), charged, then ``run`` and
    released with DP noise. What a charged plan that did not release becomes is a failure
    (``failed``), even a refusal met while running: a refusal says "nothing was charged"."""
    spec = compiled.dp
    assert spec is not None
    if not plan.request_id:
        raise PlanRefused("a DP plan needs a request id")
    guard.admit(plan, spec.table)
    with guard.request_lock(plan.request_id):
        cached = guard.cached(plan.request_id)
        if cached is not None:
            return Execution(cached, 0, time.perf_counter() - started)
        stored = guard.failure(plan.request_id)
        if stored is not None:  # the same failure again: no second evaluation
            raise PlanFailed(*stored)
        # Charge before running: whatever happens next, the charge stands (a failure
        # that cost nothing would be a free oracle on the data).
        guard.charge(plan, spec)
        if os.environ.get("BULLE_FAILPOINT") == "after-charge":  # crash test hook:
            os._exit(86)  # charged, nothing run or released; a replay runs it once
        try:
            table = run()
            out, scales = release(table, compiled.group_names, spec)
        except Exception as e:  # the outcome of this charge, kept for its replays
            failure = e if isinstance(e, PlanFailed) else failed(e)
            guard.store_failure(plan.request_id, failure.public, failure.incident)
            raise failure from None
        result = pb.PartialResult(
            node_id=node_id, arrow_ipc=to_ipc(out),
            tier="sensitive", epsilon_spent=spec.epsilon, delta_spent=spec.delta,
            noise_scales=scales)
        guard.store(plan.request_id, result)  # before it leaves: replays get it
    return Execution(result, out.num_rows, time.perf_counter() - started)


def envelopes(con: duckdb.DuckDBPyConnection, table: str, columns: dict[str, str]
               ) -> dict[str, tuple[float, float]]:
    """Static bounds for the numeric columns of a restricted or open table that declare
    none (nodes/_restricted.py ``envelope``), computed once at load."""
    numeric = [c for c, t in columns.items() if type_family(t) in ("integer", "number")]
    if not numeric:
        return {}
    items = ", ".join(f"min({_quote(c)}), max({_quote(c)})" for c in numeric)
    found = con.execute(f"SELECT {items} FROM {_quote(table)}").fetchall()[0]
    return {c: envelope(_finite(found[2 * i]), _finite(found[2 * i + 1]))
            for i, c in enumerate(numeric)}


def _finite(v: object) -> float | None:
    x = None if v is None else float(v)  # type: ignore[arg-type]
    return x if x is not None and math.isfinite(x) else None


def max_unit_rows(con: duckdb.DuckDBPyConnection, ds: DatasetConfig) -> int:
    """The most rows one unit has: lets DP plans skip the per-unit rank, and restricted
    plans the per-unit aggregation."""
    if ds.tier == "open" or not ds.privacy_unit:
        return 0
    if ds.privacy_unit == ROW_UNIT:  # each row is its own unit
        return 1
    return int(con.sql(f"SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM "
                       f"{_quote(ds.table)} GROUP BY {_quote(ds.privacy_unit)})"
                       ).fetchall()[0][0])
