"""Plan → SQL at the node (nodes/_compile.py) on plain table metadata; and the static
bounds of a restricted aggregate's argument (nodes/_restricted.py)."""

from __future__ import annotations

import duckdb
import pytest

from federation._planner import plan_query
from federation._sql import parse
from federation._tree import Call, Col, Lit, to_proto
from federation.proto import bulle_pb2 as pb
from nodes._compile import PlanRefused, TableMeta, compile_plan
from nodes._restricted import contribution_bounds

COLUMNS = {"pid": "VARCHAR", "sex": "VARCHAR", "g3": "BIGINT"}


def _meta(name: str, tier: str, **kw: object) -> TableMeta:
    defaults: dict[str, object] = {
        "columns": COLUMNS, "privacy_unit": "pid", "public_domains": {"sex": ("F", "M")},
        "min_count": 0, "round_to": 1, "bounds": {"g3": (0.0, 20.0)}, "max_unit_rows": 1}
    return TableMeta(name, tier, **{**defaults, **kw})  # type: ignore[arg-type]


CATALOG = {"open_t": _meta("open_t", "open", privacy_unit=""),
           "dp_t": _meta("dp_t", "sensitive"),
           "other_t": _meta("other_t", "open", privacy_unit="")}


def _plan(sql: str, epsilon: float = 0.0) -> pb.Plan:
    plan = plan_query(parse(sql, {n: m.columns for n, m in CATALOG.items()})).plan
    if epsilon:
        plan.privacy.epsilon = epsilon
    return plan


def _run(sql: str, rows: str) -> list[tuple]:
    con = duckdb.connect()
    con.execute(f"CREATE TABLE open_t AS SELECT * FROM (VALUES {rows}) t(pid, sex, g3)")
    return sorted(con.execute(sql).fetchall())


def test_open_aggregates_compile_to_partials_that_run() -> None:
    compiled = compile_plan(_plan("SELECT sex, COUNT(*), SUM(g3) FROM open_t WHERE g3 > 1 "
                                  "GROUP BY sex"), CATALOG, 100)
    assert (compiled.tier, compiled.tables, compiled.is_rows) == ("open", ("open_t",), False)
    assert compiled.group_names == ("g0",) and compiled.key_domains == (("F", "M"),)
    assert compiled.aggregates == (("p0", pb.COUNT_ROWS), ("p1", pb.SUM))
    assert _run(compiled.sql, "('a', 'F', 10), ('b', 'F', 12), ('c', 'M', 1)") == [
        ("F", 2, 22)]


def test_open_rows_are_limited_to_max_rows_plus_one() -> None:
    compiled = compile_plan(_plan("SELECT sex, g3 FROM open_t ORDER BY g3"), CATALOG, 2)
    assert compiled.is_rows and compiled.group_names == ("c0", "c1")
    assert compiled.sql.endswith("LIMIT 3")


def test_a_dp_plan_bounds_each_unit_and_clamps() -> None:
    compiled = compile_plan(_plan("SELECT sex, SUM(g3) FROM dp_t GROUP BY sex", 1.0),
                            CATALOG, 100)
    assert compiled.dp is not None and compiled.tier == "sensitive"
    assert compiled.dp.epsilon == 1.0 and compiled.dp.domains == (("F", "M"),)
    assert [(p.lower, p.upper) for p in compiled.dp.partials] == [(0.0, 20.0)]
    assert "CAST(20.0 AS DOUBLE)" in compiled.sql and "__bounded" in compiled.sql
    assert "ROW_NUMBER" not in compiled.sql  # one row per unit, known at load time
    unknown = {**CATALOG, "dp_t": _meta("dp_t", "sensitive", max_unit_rows=0)}
    ranked = compile_plan(_plan("SELECT COUNT(*) FROM dp_t", 1.0), unknown, 100)
    assert "ROW_NUMBER() OVER (PARTITION BY" in ranked.sql and '"__rn" <= 1' in ranked.sql


@pytest.mark.parametrize(("plan", "message"), [
    (_plan("SELECT COUNT(*) FROM dp_t"), "carries no ε"),
    (_plan("SELECT COUNT(*) FROM dp_t", 11.0), "at most 10"),
    (_plan("SELECT pid FROM dp_t", 1.0), "row-level output"),
    (_plan("SELECT COUNT(*) FROM open_t a JOIN dp_t d ON a.pid = d.pid", 1.0),
     "must be the plan's source"),
    (_plan("SELECT COUNT(*) FROM open_t a JOIN other_t b ON a.g3 > b.g3"), "equalities"),
])
def test_refusals(plan: pb.Plan, message: str) -> None:
    with pytest.raises(PlanRefused, match=message):
        compile_plan(plan, CATALOG, 100)


def test_unknown_tables_and_aliases_are_refused() -> None:
    plan = _plan("SELECT COUNT(*) FROM open_t")
    with pytest.raises(PlanRefused, match="not published by this node"):
        compile_plan(plan, {}, 100)
    plan.joins.add(table=pb.TableRef(table="other_t", alias="open_t"), kind="inner",
                   on=to_proto(Call("eq", (Col("open_t", "g3"), Col("open_t", "g3")))))
    with pytest.raises(PlanRefused, match="used twice"):
        compile_plan(plan, CATALOG, 100)


@pytest.mark.parametrize(("expr", "bounds"), [
    (Col("t", "x"), (0.0, 20.0)),
    (Lit(None), (0.0, 0.0)),
    (Call("neg", (Col("t", "x"),)), (-20.0, -0.0)),
    (Call("sub", (Lit(5), Col("t", "x"))), (-15.0, 5.0)),
    (Call("mul", (Col("t", "x"), Lit(-2))), (-40.0, 0.0)),
    (Call("abs", (Call("sub", (Col("t", "x"), Lit(10))),)), (0.0, 10.0)),
    (Call("case", (Call("gt", (Col("t", "x"), Lit(3))), Lit(7))), (0.0, 7.0)),
    (Call("round", (Col("t", "x"),)), (-1.0, 21.0)),
    (Call("gt", (Col("t", "y"), Lit(3))), (0.0, 1.0)),
    (Col("t", "y"), None),
    (Call("div", (Col("t", "x"), Lit(2))), None),
])
def test_contribution_bounds(expr: object, bounds: tuple[float, float] | None) -> None:
    assert contribution_bounds(to_proto(expr), {("t", "x"): (0.0, 20.0)}) == bounds
