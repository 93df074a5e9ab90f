"""Merge the nodes' partial results into the released table (DuckDB over Arrow)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
from sqlglot import exp

from federation._planner import MERGE_FN, FederatedPlan, M, merged_form
from federation._tree import Agg, Call, Col, Expr, Lit, contains_agg, to_proto
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


@dataclass
class Released:
    table: pa.Table
    suppressed: list[list[bool]]  # per row, per column
    notes: list[str] = field(default_factory=list)
    suppressed_cells: int = 0
    hidden_cells: int = 0


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
    cur = _cursor()
    cur.register("parts", table)
    try:
        out = cur.sql(sql).to_arrow_table()
    finally:
        cur.unregister("parts")
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

    keys = ", ".join(_q(g) for g in fp.group_names)
    merged_cols = [f"{MERGE_FN[p.kind]}({_q(p.name)}) AS {_q(p.name)}" for p in fp.partials]
    flag = "bool_or(__suppressed)"
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
        e = items[o.expr.name] if isinstance(o.expr, Col) and o.expr.table == "" \
            else final(o.expr)
        cols.append(f"{_sql(e)} AS __o{i}")
        order.append(f"__o{i} {'DESC' if o.descending else 'ASC'} NULLS LAST")
    sql = f"SELECT {', '.join(cols)}, __suppressed FROM ({inner}) AS {M}"
    if q.having is not None:
        sql += f" WHERE ({_sql(final(q.having))}) IS NOT FALSE"
    if order:
        sql += " ORDER BY " + ", ".join(order)
    if q.limit is not None:
        sql += f" LIMIT {int(q.limit)}"
    cur = _cursor()
    cur.register("parts", table)
    try:
        out = cur.sql(sql).to_arrow_table()
    finally:
        cur.unregister("parts")
    flags = out.column("__suppressed").to_pylist()
    out = out.select(list(items))
    derived = [contains_agg(i.expr) for i in q.items]
    suppressed = [[bool(f) and d for d in derived] for f in flags]
    hidden = sum(r.hidden_cells for r, _ in parts)
    notes = []
    if any(flags):
        notes.append(f"{sum(1 for f in flags if f)} cell(s) suppressed (fewer than the minimum "
                     "count of units at a node, dominated by one value, or protecting another)")
    if hidden:
        notes.append(f"{hidden} cell(s) withheld with their keys at the nodes: keys not in a "
                     "declared public domain are not named when suppressed")
    if round_to > 1:
        notes.append(f"counts rounded to a multiple of {round_to}")
    return Released(out, suppressed, notes, sum(1 for f in flags if f), hidden)
