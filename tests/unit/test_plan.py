"""Query tree → per-node plan of partial aggregates (federation/_planner.py)."""

from __future__ import annotations

from federation._planner import M, merged_form, plan_query
from federation._sql import parse
from federation._tree import Agg, Call, Col, Lit
from federation.proto import bulle_pb2 as pb

SCHEMA = {"pupils": {"pid": "VARCHAR", "sex": "VARCHAR", "g3": "BIGINT"}}


def test_aggregates_split_into_shared_partials() -> None:
    fp = plan_query(parse("SELECT sex, COUNT(*), SUM(g3), AVG(g3), VAR_SAMP(g3) FROM pupils "
                          "GROUP BY sex", SCHEMA))
    g3 = Col("pupils", "g3")
    # COUNT(*) → rows; SUM, AVG and VAR share one sum and one count of g3
    assert [(p.name, p.kind, p.arg) for p in fp.partials] == [
        ("p0", pb.COUNT_ROWS, None), ("p1", pb.SUM, g3), ("p2", pb.COUNT, g3),
        ("p3", pb.SUM_SQUARES, g3)]
    assert fp.roles[Agg("avg", g3)] == {"sum": "p1", "count": "p2"}
    assert fp.roles[Agg("var_samp", g3)] == {"sum": "p1", "sumsq": "p3", "count": "p2"}
    assert fp.group_names == ("g0",)
    assert [(g.name, g.expr.column.name) for g in fp.plan.group_by] == [("g0", "sex")]
    assert not fp.is_rows


def test_a_row_query_is_a_row_plan_with_positional_names() -> None:
    fp = plan_query(parse("SELECT sex AS s, g3 FROM pupils ORDER BY g3 DESC LIMIT 0", SCHEMA))
    assert fp.is_rows and fp.partials == ()
    assert [c.name for c in fp.plan.rows.columns] == ["c0", "c1"]
    assert [(o.name, o.descending) for o in fp.plan.rows.order_by] == [("c1", True)]
    assert fp.plan.rows.limit == 1  # LIMIT 0 still asks one row: the shape


def test_merged_forms() -> None:
    count = merged_form(Agg("count", None), {"count": "p0"}, 1)
    assert count == Col(M, "p0")
    rounded = merged_form(Agg("count", None), {"count": "p0"}, 5)
    assert rounded == Call("cast", (Call("mul", (Call("floor", (Call("div", (
        Call("add", (Col(M, "p0"), Lit(2))), Lit(5))),)), Lit(5))), Lit("BIGINT")))
    stddev = merged_form(Agg("stddev_pop", Col("t", "x")),
                         {"sum": "p1", "sumsq": "p2", "count": "p3"}, 1)
    assert isinstance(stddev, Call) and stddev.op == "sqrt"
