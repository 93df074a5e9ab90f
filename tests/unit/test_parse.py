"""SQL → query tree (federation/_sql.py) on a plain schema."""

from __future__ import annotations

import pytest

from federation._errors import QueryError
from federation._sql import parse
from federation._tree import Agg, Call, Col, Lit, OrderItem, OutputRef, SelectItem, TableRef

SCHEMA = {
    "pupils": {"pid": "VARCHAR", "uai": "VARCHAR", "sex": "VARCHAR", "g3": "BIGINT"},
    "schools": {"uai": "VARCHAR", "ips": "DOUBLE"},
}


def test_an_aggregate_query_becomes_a_tree() -> None:
    q = parse("SELECT sex, AVG(g3) AS mean FROM pupils WHERE g3 > 10 GROUP BY sex", SCHEMA)
    assert q.source == TableRef("pupils", "pupils")
    assert q.items == (SelectItem(Col("pupils", "sex"), "sex"),
                       SelectItem(Agg("avg", Col("pupils", "g3")), "mean"))
    assert q.where == Call("gt", (Col("pupils", "g3"), Lit(10)))
    assert q.group_by == (Col("pupils", "sex"),)
    assert q.is_aggregate


def test_order_by_an_output_column_is_an_output_ref() -> None:
    by_alias = parse("SELECT sex, COUNT(*) AS n FROM pupils GROUP BY sex ORDER BY n DESC",
                     SCHEMA)
    assert by_alias.order_by == (OrderItem(OutputRef("n"), True),)
    by_position = parse("SELECT sex, COUNT(*) AS n FROM pupils GROUP BY 1 ORDER BY 2", SCHEMA)
    assert by_position.group_by == (Col("pupils", "sex"),)
    assert by_position.order_by == (OrderItem(OutputRef("n"), False),)
    by_expression = parse("SELECT sex, COUNT(*) FROM pupils GROUP BY sex ORDER BY COUNT(*)",
                          SCHEMA)
    assert by_expression.order_by == (OrderItem(OutputRef("count_all"), False),)
    rows = parse("SELECT uai, ips FROM schools ORDER BY ips", SCHEMA)
    assert rows.order_by == (OrderItem(OutputRef("ips"), False),) and not rows.is_aggregate


def test_expressions_map_to_allow_listed_operators() -> None:
    sql = ("SELECT CASE WHEN g3 >= 10 THEN 1 ELSE 0 END AS passed, CAST(g3 AS DOUBLE) AS d, "
           "-5 AS m, COALESCE(sex, 'x') AS s FROM pupils "
           "WHERE sex IN ('F', 'M') AND g3 BETWEEN 0 AND 20 AND uai IS NULL")
    q = parse(sql, SCHEMA)
    g3 = Col("pupils", "g3")
    assert [i.expr for i in q.items] == [
        Call("case", (Call("gte", (g3, Lit(10))), Lit(1), Lit(0))),
        Call("cast", (g3, Lit("DOUBLE"))),
        Lit(-5),
        Call("coalesce", (Col("pupils", "sex"), Lit("x"))),
    ]
    assert q.where == Call("and", (
        Call("and", (Call("in", (Col("pupils", "sex"), Lit("F"), Lit("M"))),
                     Call("between", (g3, Lit(0), Lit(20))))),
        Call("is_null", (Col("pupils", "uai"),))))


def test_joins_on_and_using() -> None:
    on = parse("SELECT COUNT(*) FROM pupils p JOIN schools s ON p.uai = s.uai", SCHEMA)
    using = parse("SELECT COUNT(*) FROM pupils p JOIN schools s USING (uai)", SCHEMA)
    assert on.joins == using.joins
    assert on.joins[0].on == Call("eq", (Col("p", "uai"), Col("s", "uai")))


@pytest.mark.parametrize(("sql", "code", "message"), [
    ("SELECT COUNT(*) FROM pupils UNION SELECT COUNT(*) FROM schools", "not_allowed",
     "set operations"),
    ("SELECT COUNT(*) FROM (SELECT * FROM pupils)", "not_allowed", "subqueries"),
    ("SELECT SUM(g3) OVER () FROM pupils", "not_allowed", "window functions"),
    ("SELECT COUNT(DISTINCT pid) FROM pupils", "not_allowed", "not mergeable"),
    ("SELECT SUM(AVG(g3)) FROM pupils", "not_allowed", "cannot be nested"),
    ("SELECT MEDIAN(g3) FROM pupils", "not_allowed", "MEDIAN is not mergeable"),
    ("SELECT read_csv('x') FROM pupils", "not_allowed", "no file, network"),
    ("SELECT COUNT(*) FROM pupil", "unknown_table", "did you mean 'pupils'"),
    ("SELECT COUNT(g4) FROM pupils", "unknown_column", "did you mean 'g3'"),
    ("SELECT uai, COUNT(*) FROM pupils p JOIN schools s ON p.uai = s.uai GROUP BY 1",
     "ambiguous_column", "several tables"),
    ("SELECT sex, g3 FROM pupils GROUP BY sex", "not_allowed", "must appear in GROUP BY"),
    ("SELECT uai FROM schools ORDER BY ips", "not_allowed", "must name a selected column"),
    ("SELECT CAST(g3 AS BLOB) FROM pupils", "not_allowed", "CAST to VARBINARY is not supported"),
    ("SELECT COUNT(*) FROM pupils WHERE g3 > ?", "not_allowed", "parameters"),
    ("SELECT COUNT(*) FROM", "syntax_error", "syntax error"),
    ("DELETE FROM pupils", "not_allowed", "DELETE statements"),
])
def test_refusals_say_why(sql: str, code: str, message: str) -> None:
    with pytest.raises(QueryError) as err:
        parse(sql, SCHEMA)
    assert err.value.code == code
    assert message in str(err.value)


def test_an_unknown_column_suggests_the_columns_its_descriptions_name() -> None:
    """Issue 14: "grade" is not a column, but g3's description says it is the final grade;
    a look-alike name ("age"-style hints) comes only when no description names the word."""
    schema = {"pupils": {"pid": "VARCHAR", "age": "BIGINT", "g1": "BIGINT", "g3": "BIGINT"}}
    descriptions = {"pupils": {"age": "age in years", "g1": "first period grade (0-20)",
                               "g3": "final grade (0-20)"}}
    with pytest.raises(QueryError) as err:
        parse("SELECT AVG(grade) FROM pupils", schema, descriptions)
    assert err.value.code == "unknown_column"
    assert "did you mean 'g1' or 'g3'? (their descriptions mention 'grade')" in str(err.value)
    with pytest.raises(QueryError) as err:
        parse("SELECT AVG(p.grade) FROM pupils p", schema, descriptions)
    assert "'g1' or 'g3'" in str(err.value)
    with pytest.raises(QueryError) as err:  # nothing describes it: the look-alike name
        parse("SELECT AVG(agee) FROM pupils", schema, descriptions)
    assert "did you mean 'age'?" in str(err.value) and "description" not in str(err.value)
