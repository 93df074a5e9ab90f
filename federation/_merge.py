"""Merge the nodes' partial results into the released table (DuckDB over Arrow)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from federation._planner import MERGE_FN, FederatedPlan, M, merged_form
from federation._precision import noise_interval
from federation._tree import Agg, Call, Col, Expr, Lit, OutputRef, contains_agg, to_proto
from federation.proto import bulle_pb2 as pb
from federation.proto.ops import to_sql

_local = threading.local()
_ROOT = duckdb.connect(":memory:", config={"threads": 1})
_ROOT_LOCK = threading.Lock()


def _cursor() -> duckdb.DuckDBPyConnection:
    cur = getattr(_local, "cur", None)
    if cur is None:
        with _ROOT_LOCK:
            cur = _local.cur = _ROOT.cursor()
    return cur


def _query(sql: str, name: str, table: pa.Table) -> pa.Table:
    """Run ``sql`` over ``table`` registered as ``name`` on this thread's connection."""
    cur = _cursor()
    cur.register(name, table)
    try:
        return cur.sql(sql).to_arrow_table()
    finally:
        cur.unregister(name)


@dataclass
class Released:
    table: pa.Table
    suppressed: list[list[bool]]  # per row, per column
    notes: list[str] = field(default_factory=list)
    suppressed_cells: int = 0
    hidden_cells: int = 0
    # DP releases: per row, per column (None where the value carries no noise)
    noise_sd: list[list[float | None]] | None = None
    ci_low: list[list[float | None]] | None = None
    ci_high: list[list[float | None]] | None = None


def _q(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql("duckdb")


def _resolve(table: str, name: str) -> exp.Expression:
    return exp.Column(this=exp.to_identifier(name, quoted=True),
                      table=exp.to_identifier(table, quoted=True))


def _sql(e: Expr) -> str:
    return to_sql(to_proto(e), _resolve).sql("duckdb")


def merge(fp: FederatedPlan, parts: list[tuple[pb.PartialResult, pa.Table]],
          max_rows: int) -> Released:
    if fp.is_rows:
        return _merge_rows(fp, parts, max_rows)
    return _merge_aggregates(fp, parts)


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 \
        else tables[0]


BOOTSTRAP_DRAWS = 2000
LEVEL = 0.95


def _dp_note(parts: list[tuple[pb.PartialResult, pa.Table]]) -> str:
    eps = ", ".join(f"{r.node_id} ε={r.epsilon_spent:g}" for r, _ in parts)
    return (f"differentially private: Laplace noise added at each node ({eps}); intervals "
            "are 95% for the noise only")


Simulate = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _dp_intervals(fp: FederatedPlan, merged: pa.Table, row_ids: np.ndarray, out: pa.Table,
                  parts: list[tuple[pb.PartialResult, pa.Table]], simulate: Simulate
                  ) -> tuple[list[list[float | None]], ...]:
    """Noise sd and 95% interval of every released value, by parametric bootstrap.

    Post-processing of public figures only (released partials and the nodes' noise
    scales): each merged partial is redrawn with the sum of the nodes' Laplace noises and
    every output expression recomputed (``simulate``: the released items over the redrawn
    partials, in the samples' order); the basic bootstrap interval is
    [r − q₉₇.₅(d), r − q₂.₅(d)] with d = f(redrawn) − r; delta-method-like for ratios
    (AVG, VAR). Bare counts and sums get their exact law instead (``_exact_laws``); a
    query of only those runs no bootstrap.
    """
    sd, lo, hi = _cells(out), _cells(out), _cells(out)
    laws = _exact_laws(fp, parts, out)
    if any(contains_agg(i.expr) and i.name not in laws for i in fp.query.items):
        _bootstrap(fp, merged, row_ids, out, parts, simulate, (sd, lo, hi))
    _exact_intervals(out, laws, (sd, lo, hi))  # bare counts and sums: no bootstrap needed
    return sd, lo, hi


def _cells(out: pa.Table) -> list[list[float | None]]:
    """A value per released cell, none yet."""
    return [[None] * out.num_columns for _ in range(out.num_rows)]


def _bootstrap(fp: FederatedPlan, merged: pa.Table, row_ids: np.ndarray, out: pa.Table,
               parts: list[tuple[pb.PartialResult, pa.Table]], simulate: Simulate,
               intervals: tuple[list[list[float | None]], ...]) -> None:
    sd, lo, hi = intervals
    n = merged.num_rows
    draws = max(200, min(BOOTSTRAP_DRAWS, 400_000 // max(n, 1)))
    rng = np.random.default_rng()
    rows = np.repeat(np.arange(n), draws)
    columns: dict[str, Any] = {"__i": rows, "__suppressed": np.zeros(n * draws, dtype=bool)}
    for g in fp.group_names:  # an Arrow take: repeating Python strings cost ~30 ms a key
        columns[g] = merged.column(g).take(rows)
    for p in fp.partials:
        base = np.repeat(merged.column(p.name).to_numpy(zero_copy_only=False)
                         .astype(float), draws)
        noise = _laplace_sums(rng, [r.noise_scales.get(p.name, 0.0) for r, _ in parts],
                              n * draws)
        columns[p.name] = base + noise
    sims = simulate(columns)  # row i's draws are entries i·draws … (i+1)·draws − 1
    names = out.column_names
    levels = [(1 - LEVEL) / 2, (1 + LEVEL) / 2]
    for name, values in sims.items():
        col = names.index(name)
        released = out.column(name).to_numpy(zero_copy_only=False).astype(float)
        d = values.astype(float).reshape(n, draws)[row_ids] - released[:, None]
        finite = np.isfinite(d)
        whole = finite.all(axis=1)  # every draw finite: all such rows at once
        q, sds = np.quantile(d[whole], levels, axis=1), np.std(d[whole], axis=1)
        for k, row in enumerate(np.flatnonzero(whole)):
            _interval((sd, lo, hi), row, col, released[row], q[0][k], q[1][k], sds[k])
        for row in np.flatnonzero(~whole & np.isfinite(released)):
            kept = d[row][finite[row]]  # a ratio over a zero count, say: those draws drop
            if kept.size >= draws // 2:
                q_lo, q_hi = np.quantile(kept, levels)
                _interval((sd, lo, hi), row, col, released[row], q_lo, q_hi, np.std(kept))


def _laplace_sums(rng: np.random.Generator, scales: list[float], size: int) -> np.ndarray:
    """``size`` draws of the sum of independent Laplace(b) noises, one per node's scale b.

    Laplace(b) is the difference of two Exp(b), so a sum of k of them is Gamma(k, b) −
    Gamma(k, b), exactly: the nodes sharing a scale cost two draws, however many they are
    (30 nodes: 15× fewer draws than one Laplace each)."""
    out = np.zeros(size)
    for b, k in Counter(b for b in scales if b > 0).items():
        out += rng.gamma(k, b, size) - rng.gamma(k, b, size)
    return out


def _interval(intervals: tuple[list[list[float | None]], ...], row: int, col: int,
              released: float, q_lo: float, q_hi: float, noise_sd: float) -> None:
    """Row ``row``'s sd and basic bootstrap interval [r − q₉₇.₅, r − q₂.₅]."""
    sd, lo, hi = intervals
    sd[row][col] = float(noise_sd)
    lo[row][col], hi[row][col] = float(released - q_hi), float(released - q_lo)


def _exact_laws(fp: FederatedPlan, parts: list[tuple[pb.PartialResult, pa.Table]],
                out: pa.Table) -> dict[str, tuple[float, float]]:
    """A bare COUNT or SUM is one merged partial: its noise is the sum of the nodes'
    Laplace noises (rounded at each node for counts), whose law is known (sd, 95% half-width:
    federation/_precision.py). Item name → that law, for the items it applies to."""
    kinds = {p.name: p.kind for p in fp.partials}
    laws = {}
    for item in fp.query.items:
        agg = item.expr
        if not isinstance(agg, Agg) or agg.func not in ("count", "sum") \
                or item.name not in out.column_names:
            continue
        partial = fp.roles[agg][agg.func]
        s, w = noise_interval(kinds[partial], [r.noise_scales.get(partial, 0.0)
                                                for r, _ in parts])
        if s:
            laws[item.name] = (s, w)
    return laws


def _exact_intervals(out: pa.Table, laws: dict[str, tuple[float, float]],
                     intervals: tuple[list[list[float | None]], ...]) -> None:
    """The sd and 95% interval of the items with a known noise law, set from it."""
    sd, lo, hi = intervals
    for name, (s, w) in laws.items():
        col = out.column_names.index(name)
        for row, value in enumerate(out.column(name).to_pylist()):
            if value is not None and np.isfinite(float(value)):
                sd[row][col] = s
                lo[row][col], hi[row][col] = float(value) - w, float(value) + w


def _simulate_sql(fp: FederatedPlan, items: dict[str, Expr]) -> Simulate:
    noisy = [i.name for i in fp.query.items if contains_agg(i.expr)]

    def simulate(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sql = "SELECT __i, " + ", ".join(f"{_sql(items[n])} AS {_q(n)}" for n in noisy) \
            + f" FROM samples AS {M}"
        sims = _query(sql, "samples", pa.table(columns))
        order = np.argsort(sims.column("__i").to_numpy(), kind="stable")
        return {n: sims.column(n).to_numpy(zero_copy_only=False)[order] for n in noisy}

    return simulate


def _simulate_arrow(fp: FederatedPlan, round_to: int) -> Simulate:
    """The plain shape's items (keys and bare aggregates) with ``_arrow_form``."""
    noisy = [i for i in fp.query.items if isinstance(i.expr, Agg)]

    def simulate(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = pa.table(columns)
        return {i.name: _arrow_form(i.expr, fp.roles[i.expr], round_to, samples)
                .to_numpy(zero_copy_only=False) for i in noisy}

    return simulate


def _merge_rows(fp: FederatedPlan, parts: list[tuple[pb.PartialResult, pa.Table]],
                max_rows: int) -> Released:
    q = fp.query
    table = _concat([t for _, t in parts])
    sql = "SELECT * FROM parts"
    if q.order_by:
        names = [i.name for i in q.items]
        keys = [f"c{names.index(o.expr.name)} {'DESC' if o.descending else 'ASC'} NULLS LAST"
                for o in q.order_by]
        sql += " ORDER BY " + ", ".join(keys)
    limit = min(q.limit, max_rows + 1) if q.limit is not None else max_rows + 1
    sql += f" LIMIT {int(limit)}"
    out = _query(sql, "parts", table)
    notes = []
    if out.num_rows > max_rows:
        out = out.slice(0, max_rows)
        notes.append(f"truncated to {max_rows} rows: add a LIMIT or a filter")
    out = out.rename_columns([i.name for i in q.items])
    return Released(out, [[False] * out.num_columns for _ in range(out.num_rows)], notes)


def _merge_aggregates(fp: FederatedPlan, parts: list[tuple[pb.PartialResult, pa.Table]]
                      ) -> Released:
    q = fp.query
    round_to = max((r.round_to for r, _ in parts), default=1)
    hidden_nodes = [i for i, (r, _) in enumerate(parts) if r.hidden_cells > 0]
    tables = [t.append_column("__node", pa.array([i] * t.num_rows, pa.int32()))
              for i, (_, t) in enumerate(parts)]
    table = _concat(tables)
    dp = any(r.noise_scales for r, _ in parts)
    fast = None if hidden_nodes else _merge_in_arrow(fp, table, round_to)
    if fast is not None:
        out, flags, merged, row_ids = fast
        if dp:
            return _dp_released(fp, parts, out, merged, row_ids,
                                _simulate_arrow(fp, round_to))
        return _released(fp, parts, out, flags, round_to)

    keys = ", ".join(_q(g) for g in fp.group_names)
    merged_cols = [f"{MERGE_FN[p.kind]}({_q(p.name)}) AS {_q(p.name)}" for p in fp.partials]
    # A part below the threshold at one node is left out (its values are NULL, which the
    # sums skip); the merged cell is "< k" only when no node released a part of it.
    flag = "bool_and(__suppressed)"
    if hidden_nodes:
        # A node that hid cells may hold part of any group it did not name: such a merged
        # group is suppressed whole (privacy/_sdc.py, rule 4).
        ids = ", ".join(str(i) for i in hidden_nodes)
        flag += (f" OR count(DISTINCT __node) FILTER (WHERE __node IN ({ids}))"
                 f" < {len(hidden_nodes)}")
    select = ", ".join([*(_q(g) for g in fp.group_names), *merged_cols,
                        f"({flag}) AS __suppressed"])
    inner = f"SELECT {select} FROM parts" + (f" GROUP BY {keys}" if keys else "")

    group_map = {g: Col(M, name) for g, name in zip(q.group_by, fp.group_names, strict=True)}
    suppressed_col = Col(M, "__suppressed")

    def final(e: Expr) -> Expr:
        if e in group_map:
            return group_map[e]
        if isinstance(e, Agg):
            form = merged_form(e, fp.roles[e], round_to)
            return Call("case", (suppressed_col, Lit(None), form))
        if isinstance(e, Call):
            return Call(e.op, tuple(final(a) for a in e.args))
        return e

    items = {i.name: final(i.expr) for i in q.items}
    cols = [f"{_sql(e)} AS {_q(name)}" for name, e in items.items()]
    order = []
    for i, o in enumerate(q.order_by):
        e = items[o.expr.name] if isinstance(o.expr, OutputRef) else final(o.expr)
        cols.append(f"{_sql(e)} AS __o{i}")
        order.append(f"__o{i} {'DESC' if o.descending else 'ASC'} NULLS LAST")
    # DP releases keep the merged partials (and a row id) for the interval bootstrap;
    # otherwise one statement does it all (DuckDB planning is a large share of a small merge)
    source = "merged" if dp else f"({inner})"
    sql = f"SELECT {', '.join(cols)}, __suppressed{', __i' if dp else ''} FROM {source} AS {M}"
    if q.having is not None:
        sql += f" WHERE ({_sql(final(q.having))}) IS NOT FALSE"
    # the group keys break ties (and order an unordered result): a row's position must
    # not depend on which node held it or whether it holds anyone
    order += [f"{M}.{_q(g)} ASC NULLS LAST" for g in fp.group_names]
    if order:
        sql += " ORDER BY " + ", ".join(order)
    if q.limit is not None:
        sql += f" LIMIT {int(q.limit)}"
    if dp:
        merged = _query(inner, "parts", table)
        merged = merged.append_column("__i", pa.array(range(merged.num_rows), pa.int64()))
        out = _query(sql, "merged", merged)
        row_ids = out.column("__i").to_numpy()
    else:
        out = _query(sql, "parts", table)
    flags = out.column("__suppressed").to_pylist()
    out = out.select(list(items))
    if dp:
        return _dp_released(fp, parts, out, merged, row_ids, _simulate_sql(fp, items))
    return _released(fp, parts, out, flags, round_to)


def _dp_released(fp: FederatedPlan, parts: list[tuple[pb.PartialResult, pa.Table]],
                 out: pa.Table, merged: pa.Table, row_ids: np.ndarray,
                 simulate: Simulate) -> Released:
    released = Released(out, [[False] * out.num_columns for _ in range(out.num_rows)])
    released.noise_sd, released.ci_low, released.ci_high = _dp_intervals(
        fp, merged, row_ids, out, parts, simulate)
    released.notes.append(_dp_note(parts))
    return released


def _released(fp: FederatedPlan, parts: list[tuple[pb.PartialResult, pa.Table]],
              out: pa.Table, flags: list[bool], round_to: int) -> Released:
    """The merged table with its suppression marks and notes (exact tiers)."""
    q = fp.query
    derived = [contains_agg(i.expr) for i in q.items]
    suppressed = [[bool(f) and d for d in derived] for f in flags]
    hidden = sum(r.hidden_cells for r, _ in parts)
    notes = []
    restricted = [r for r, _ in parts if r.tier == "restricted"]
    if any(r.perturbed for r in restricted):
        notes.append("restricted data: every value is perturbed at its node by the cell key "
                     "method (the same records always give the same value; the catalogue's "
                     "cell_key gives the noise)")
    k = max((r.min_count for r in restricted), default=0)
    if k > 0:
        notes.append(f"a part resting on fewer than {k} units at a node, whether 0 or small, "
                     "is left out of the merged value; a value no node could release is "
                     f"shown as \"< {k}\" (suppressed)")
    if hidden:
        notes.append(f"{hidden} cell(s) withheld with their keys at the nodes: keys not in a "
                     "declared public domain are not named when suppressed")
    if round_to > 1:
        notes.append(f"counts rounded to a multiple of {round_to}")
    return Released(out, suppressed, notes, sum(1 for f in flags if f), hidden)


# -- the same merge in pyarrow, for plain queries ------------------------------------------
# DuckDB plans every merge statement afresh (a prepared statement would keep the first
# registered table): ~3.5 ms, plus ~3 ms of SQL generation, for a few dozen rows. A query
# whose items are group keys and plain aggregates, without HAVING and ordered by output
# columns, is merged here in ~0.4 ms with the same expressions as ``merged_form``.

_F64 = pa.float64()


def _merge_in_arrow(fp: FederatedPlan, table: pa.Table, round_to: int
                    ) -> tuple[pa.Table, list[bool], pa.Table, np.ndarray] | None:
    """(released table, suppression flags, merged partials with a row id ``__i``, the
    merged row of each released row), or None when the query is not plain."""
    q = fp.query
    keys = dict(zip(q.group_by, fp.group_names, strict=True))
    if q.having is not None or not all(i.expr in keys or isinstance(i.expr, Agg)
                                       for i in q.items):
        return None
    names = [i.name for i in q.items]
    order = []
    for o in q.order_by:
        if isinstance(o.expr, OutputRef) and o.expr.name in names:
            name = o.expr.name
        else:
            name = next((i.name for i in q.items if i.expr == o.expr), None)
            if name is None:
                return None
        order.append((name, "descending" if o.descending else "ascending", "at_end"))
    try:
        for g in fp.group_names:  # -0.0 and 0.0 are one group in SQL: + 0.0 makes -0.0 0.0
            if pa.types.is_floating(table.schema.field(g).type):
                i = table.schema.get_field_index(g)
                table = table.set_column(i, g, pc.add(table.column(g), 0.0))
        merged = table.group_by(list(fp.group_names), use_threads=False).aggregate(
            [(p.name, MERGE_FN[p.kind]) for p in fp.partials]  # sum/min/max: pyarrow's names
            + [("__suppressed", "all")])
        merged = merged.rename_columns([c.rsplit("_", 1)[0] if c not in keys.values() else c
                                        for c in merged.column_names])
        if fp.group_names:  # key order first; the ORDER BY below is a stable sort
            merged = merged.sort_by([(g, "ascending", "at_end") for g in fp.group_names])
        merged = merged.append_column("__i", pa.array(np.arange(merged.num_rows)))
        flag = merged.column("__suppressed")
        columns = {}
        for item in q.items:
            if item.expr in keys:
                columns[item.name] = merged.column(keys[item.expr])
            else:
                value = _arrow_form(item.expr, fp.roles[item.expr], round_to, merged)
                columns[item.name] = pc.if_else(flag, pa.scalar(None, value.type), value)
        out = pa.table(columns)
        row_ids = merged.column("__i")
        if order:
            idx = pc.sort_indices(out, sort_keys=order)  # NULLS LAST, as the SQL merge
            out, flag, row_ids = out.take(idx), flag.take(idx), row_ids.take(idx)
        if q.limit is not None:
            keep = max(q.limit, 0)
            out, flag, row_ids = out.slice(0, keep), flag.slice(0, keep), row_ids.slice(0, keep)
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid):
        return None  # a type pyarrow does not aggregate or cast like DuckDB: DuckDB merges
    return (out, [bool(f) for f in flag.to_pylist()], merged,
            row_ids.to_numpy(zero_copy_only=False))


def _arrow_form(agg: Agg, roles: dict[str, str], round_to: int, m: pa.Table) -> pa.Array:
    """``merged_form`` evaluated with pyarrow.compute (same casts, same NULL rules)."""
    col = {role: m.column(name) for role, name in roles.items()}
    if agg.func == "count":
        c = col["count"]
        if round_to > 1:  # presentation rounding, half up, on released counts
            half = pc.cast(pc.add(c, round_to // 2), _F64)
            c = pc.cast(pc.multiply(pc.floor(pc.divide(half, float(round_to))),
                                    float(round_to)), pa.int64())
        return c
    if agg.func in ("sum", "min", "max"):
        return col[agg.func]
    n = pc.cast(col["count"], _F64)
    n = pc.if_else(pc.equal(n, 0.0), pa.scalar(None, _F64), n)
    total = pc.cast(col["sum"], _F64)
    mean = pc.divide(total, n)
    if agg.func == "avg":
        return mean
    ss = pc.max_element_wise(pc.subtract(pc.cast(col["sumsq"], _F64),
                                         pc.multiply(mean, total)), 0.0)
    if agg.func.endswith("_pop"):
        denom = n
    else:
        less = pc.subtract(n, 1.0)
        denom = pc.if_else(pc.equal(less, 0.0), pa.scalar(None, _F64), less)
    var = pc.divide(ss, denom)
    return pc.sqrt(var) if agg.func.startswith("stddev") else var
