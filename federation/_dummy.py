"""Dummy data: tables shaped like the catalogue's, drawn from public metadata only.

A dummy table has the catalogue's columns with their declared types; each value is drawn
from what the catalogue already publishes, never from a row:

- a column with a declared public domain: uniformly among the domain's values;
- a numeric column with declared bounds: uniformly within them (whole numbers for an
  integer column);
- anything else is a placeholder with no relation to the data: integers 0–100, numbers in
  [0, 100), text ``<column>_<k>`` for k in 0–19 (so joins on such keys match), booleans at
  50%, dates in 2020;
- NULLs at the rate the quality report publishes (1 − completeness), rounded to 5 points.

``run_dummy`` runs a query as the federation would, on one dummy partition per node that
takes part: the coordinator's own checks (a query the real run would refuse is refused),
its planner (each node's partial aggregates, computed here in DuckDB on the dummy
partition), its merge and post-processing. The answer has the shape of the real one
(columns, types, notes); nothing is charged and no node is sent anything.
"""

from __future__ import annotations

import hashlib
import math
import time
from datetime import date, datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from sqlglot import exp

from federation import _checks as checks
from federation import _dp_rules as dp_rules
from federation._catalog import FederatedTable
from federation._errors import QueryError
from federation._merge import merge
from federation._planner import FederatedPlan, plan_query
from federation._sql import parse
from federation._tree import Expr, to_proto
from federation.proto import bulle_pb2 as pb
from federation.proto.ops import DATE, NUM, TS, column, family, to_sql

DEFAULT_ROWS = 1000
MAX_ROWS = 100_000
PLACEHOLDER = (0, 100)  # the range of a number column without declared bounds
TEXT_KEYS = 20  # placeholder texts per column
NOTE = ("dummy data: values drawn from public metadata only (public domains, declared "
        "bounds, types, null rates from the quality report), never from rows; not a result. "
        "Nothing was charged and no node was asked.")


def _rng(seed: int, *parts: str) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def null_rate(table: FederatedTable, col: str, node: str | None = None) -> float:
    """1 − the published completeness of ``col`` (at ``node``, else the lowest among the
    nodes), rounded to 5 points; 0 when no report gives it."""
    reports = [table.quality[node]] if node in table.quality else list(table.quality.values())
    pcts = [q.get("column_completeness_pct", {}).get(col) for q in reports]
    pcts = [p for p in pcts if p is not None]
    if not pcts:
        return 0.0
    return round(20 * (1 - min(pcts) / 100)) / 20


def _is_integer(duck_type: str) -> bool:
    base = duck_type.upper().split("(")[0].strip()
    return family(duck_type) == NUM and (base.endswith("INT") or base == "INTEGER")


def _values(table: FederatedTable, col: str, duck_type: str, rows: int,
            rng: np.random.Generator) -> pa.Array:
    domain = table.public_domains.get(col)
    fam = family(duck_type)
    if domain:
        return pa.array(rng.choice(np.array(domain, dtype=object), rows), pa.string())
    if fam == NUM:
        lo, hi = table.bounds.get(col, PLACEHOLDER)
        if _is_integer(duck_type):
            first, last = math.ceil(lo), math.floor(hi)
            return pa.array(rng.integers(first, max(first, last) + 1, rows), pa.int64())
        return pa.array(rng.uniform(lo, hi, rows) if hi > lo else np.full(rows, float(lo)),
                        pa.float64())
    if fam == DATE:
        days = rng.integers(0, 366, rows)
        return pa.array([date(2020, 1, 1) + timedelta(days=int(d)) for d in days], pa.date32())
    if fam == TS:
        secs = rng.integers(0, 366 * 86400, rows)
        return pa.array([datetime(2020, 1, 1) + timedelta(seconds=int(s)) for s in secs],
                        pa.timestamp("us"))
    if duck_type.upper().startswith("BOOL"):
        return pa.array(rng.random(rows) < 0.5, pa.bool_())
    return pa.array([f"{col}_{k}" for k in rng.integers(0, TEXT_KEYS, rows)], pa.string())


def dummy_arrow(table: FederatedTable, rows: int = DEFAULT_ROWS, seed: int = 0,
                node: str | None = None) -> pa.Table:
    """One dummy partition of ``table`` (its node's null rates), values as Arrow types the
    declared ones are cast from (see :func:`load`)."""
    if not 0 <= rows <= MAX_ROWS:
        raise QueryError("bad_request", f"rows must be between 0 and {MAX_ROWS}")
    rng = _rng(seed, table.name, node or "")
    out = {}
    for col, duck_type in table.columns.items():
        values = _values(table, col, duck_type, rows, rng)
        nulls = rng.random(rows) < null_rate(table, col, node)
        out[col] = values if not nulls.any() else pa.array(
            values.to_pylist(), values.type, mask=nulls)
    return pa.table(out) if out else pa.table({})


def load(con: duckdb.DuckDBPyConnection, table: FederatedTable, rows: int, seed: int,
         node: str | None = None) -> None:
    """Create ``table`` in ``con`` as a dummy partition with its declared column types."""
    data = dummy_arrow(table, rows, seed, node)
    src = f"__dummy_{hashlib.sha256(table.name.encode()).hexdigest()[:12]}"
    con.register(src, data)
    try:
        cols = ", ".join(
            f"TRY_CAST({_q(c)} AS {t}) AS {_q(c)}" for c, t in table.columns.items())
        con.execute(f"CREATE OR REPLACE TABLE {_q(table.name)} AS SELECT {cols} FROM {src}")
    finally:
        con.unregister(src)


def dummy_table(table: FederatedTable, rows: int = DEFAULT_ROWS, seed: int = 0) -> pa.Table:
    """The dummy table ``hub.dummy`` returns: declared types, the lowest completeness."""
    with duckdb.connect(":memory:", config={"threads": 1}) as con:
        load(con, table, rows, seed)
        return con.sql(f"SELECT * FROM {_q(table.name)}").to_arrow_table()


def dummy_json(table: FederatedTable, rows: int = DEFAULT_ROWS, seed: int = 0
               ) -> dict[str, Any]:
    """``GET /v1/dummy/{table}``: the dummy table as JSON columns (with their declared
    types) and rows."""
    from federation._coordinator import _json_type, _json_value

    data = dummy_table(table, rows, seed)
    return {"table": table.name, "seed": seed, "notes": [NOTE],
            "columns": [{"name": f.name, "type": _json_type(f.type),
                         "sql_type": table.columns[f.name]} for f in data.schema],
            "rows": [[_json_value(v) for v in r.values()] for r in data.to_pylist()]}


def _q(name: str) -> str:
    return exp.to_identifier(name, quoted=True).sql("duckdb")


# -- running a query on dummy partitions ------------------------------------------------

def _partial_sql(fp: FederatedPlan, types: dict[str, dict[str, str]]) -> str:
    """What a node computes for ``fp``, as one DuckDB statement over tables named as in
    the catalogue (``types``: alias -> column -> declared type)."""
    q = fp.query

    def resolve(alias: str, name: str) -> exp.Expression:
        if alias not in types or name not in types[alias]:
            raise QueryError("unknown_column", f"unknown column {alias}.{name}")
        return column(alias, name, types[alias][name])

    def sql(e: Expr, condition: bool = False) -> str:
        return to_sql(to_proto(e), resolve, condition=condition).sql("duckdb")

    source = f"{_q(q.source.table)} AS {_q(q.source.alias or q.source.table)}"
    for j in q.joins:
        kind = "LEFT JOIN" if j.kind == "left" else "JOIN"
        source += (f" {kind} {_q(j.table.table)} AS {_q(j.table.alias or j.table.table)}"
                   f" ON {sql(j.on, True)}")
    where = f" WHERE {sql(q.where, True)}" if q.where is not None else ""
    if fp.is_rows:
        names = [i.name for i in q.items]
        cols = ", ".join(f"{sql(i.expr)} AS c{n}" for n, i in enumerate(q.items))
        order = ", ".join(f"c{names.index(o.expr.name)} {'DESC' if o.descending else 'ASC'}"
                          for o in q.order_by)
        limit = f" LIMIT {max(q.limit, 0) or 1}" if q.limit is not None else ""
        return f"SELECT {cols} FROM {source}{where}" + (f" ORDER BY {order}" if order else "") \
            + limit
    keys = [f"{sql(k)} AS {_q(n)}" for k, n in zip(q.group_by, fp.group_names, strict=True)]
    aggs = []
    for p in fp.partials:
        arg = sql(p.arg) if p.arg is not None else "*"
        value = {pb.COUNT_ROWS: "count(*)", pb.COUNT: f"count({arg})", pb.SUM: f"sum({arg})",
                 pb.SUM_SQUARES: f"sum(CAST({arg} AS DOUBLE) * CAST({arg} AS DOUBLE))",
                 pb.MIN: f"min({arg})", pb.MAX: f"max({arg})"}[p.kind]
        aggs.append(f"{value} AS {_q(p.name)}")
    group = " GROUP BY " + ", ".join(str(i + 1) for i in range(len(keys))) if keys else ""
    return f"SELECT {', '.join([*keys, *aggs, 'false AS __suppressed'])} FROM {source}" \
        f"{where}{group}"


def run_dummy(coordinator: Any, sql: str, researcher: Any, project: str | None,
              rows: int = DEFAULT_ROWS, seed: int = 0) -> dict[str, Any]:
    """The answer ``sql`` would have, computed on dummy partitions (module docstring)."""
    from federation._coordinator import released_to_json

    started = time.perf_counter()
    project = coordinator.project_of(researcher, project)
    catalog = coordinator.catalog()
    query = parse(sql, {n: t.columns for n, t in catalog.items()},
                  {n: t.descriptions for n, t in catalog.items()})
    checked = checks.check(query, catalog)  # the real run's refusals, for free
    nodes, excluded = checked.participants
    if checked.tier == "sensitive":  # its details are shown to the grant's researchers only
        coordinator._check_sensitive(query, checked.tables, checked.tier, catalog, project,
                                     researcher.name)
    fp = plan_query(query)
    refs = [query.source, *(j.table for j in query.joins)]
    types = {r.alias or r.table: catalog[r.table].columns for r in refs}
    statement = _partial_sql(fp, types)
    parts = []
    for node in nodes:
        with duckdb.connect(":memory:", config={"threads": 1}) as con:
            for name in query.tables:
                load(con, catalog[name], rows, seed, node)
            try:
                partial = con.sql(statement).to_arrow_table()
            except duckdb.Error as e:  # about dummy values only: safe to show
                raise QueryError("dummy_failed", "the query could not be evaluated on dummy "
                                 f"data: {str(e).splitlines()[0][:300]}") from None
            parts.append((pb.PartialResult(node_id=node, tier=checked.tier), partial))
    released = merge(fp, parts, coordinator.config.max_rows)
    if checked.tier == "sensitive":
        released.table = dp_rules.post_process(
            released.table, None, dp_rules.ranges(query, dp_rules.bounds_of(query, catalog)))
        released.notes.append("sensitive data: the real answer carries Laplace noise, a noise "
                              "sd and a 95% interval per value; here there is none")
    if excluded:
        released.notes.append(f"nodes {', '.join(excluded)} do not hold every joined table "
                              "and would not take part")
    released.notes.insert(0, NOTE)
    out = released_to_json(released, nodes, checked.tier, time.perf_counter() - started)
    out.update(dummy=True, epsilon_spent=0.0)
    return out
