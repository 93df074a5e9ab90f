"""The coordinator's static rules (federation/_checks.py) on plain data: no servers."""

from __future__ import annotations

import pytest

from federation._catalog import FederatedTable
from federation._checks import RULES, check
from federation._errors import QueryError
from federation._sql import parse


def _table(name: str, tier: str, nodes: tuple[str, ...], unit_level: str = "person",
           shared: bool = False, copies: tuple[str, ...] = ()) -> FederatedTable:
    return FederatedTable(
        name=name, tier=tier, columns={"uai": "VARCHAR", "g3": "BIGINT", "sex": "VARCHAR"},
        descriptions={}, nodes=nodes, row_count_buckets={}, privacy_unit="", public_domains={},
        description="", min_count=10, round_to=1, shared=shared, copies=copies,
        unit_level=unit_level)


CATALOG = {
    "pupils": _table("pupils", "restricted", ("a", "b")),
    "schools": _table("schools", "restricted", ("a",), unit_level="institution"),
    "ref": _table("ref", "open", ("depp",), shared=True, copies=("a", "b")),
    "only_b": _table("only_b", "open", ("b",)),
    "only_c": _table("only_c", "open", ("c",)),
    "open_rows": _table("open_rows", "open", ("depp",)),
}


def _check(sql: str):
    return check(parse(sql, {n: t.columns for n, t in CATALOG.items()}), CATALOG)


def test_rules_run_in_a_declared_order() -> None:
    assert [r.__name__ for r in RULES] == [
        "rows_only_from_open_tables", "no_order_statistics_of_persons",
        "joins_inside_one_node", "no_left_join_from_a_reference"]


@pytest.mark.parametrize("sql, words", [
    ("SELECT g3 FROM pupils", "row-level output"),
    ("SELECT MAX(g3) FROM pupils", "MAX of pupils"),
    ("SELECT sex, COUNT(*) FROM pupils GROUP BY sex HAVING MIN(g3) > 3", "MIN of pupils"),
    ("SELECT sex, COUNT(*) FROM pupils GROUP BY sex ORDER BY MAX(g3)", "MAX of pupils"),
    ("SELECT COUNT(*) FROM pupils p JOIN only_c o ON p.uai = o.uai", "no node holds all"),
    ("SELECT COUNT(*) FROM ref r LEFT JOIN pupils p ON r.uai = p.uai", "LEFT JOIN"),
])
def test_refusals_say_why(sql: str, words: str) -> None:
    with pytest.raises(QueryError) as err:
        _check(sql)
    assert err.value.code == "not_allowed" and words in err.value.message


@pytest.mark.parametrize("sql, nodes", [
    ("SELECT sex, COUNT(*), AVG(g3) FROM pupils GROUP BY sex", ["a", "b"]),
    ("SELECT MIN(g3), MAX(g3) FROM schools", ["a"]),  # the unit is an institution
    ("SELECT MAX(g3) FROM open_rows", ["depp"]),
    ("SELECT uai, g3 FROM open_rows", ["depp"]),
    ("SELECT COUNT(*) FROM pupils p JOIN ref r ON p.uai = r.uai", ["a", "b"]),  # copies
    ("SELECT COUNT(*) FROM pupils p LEFT JOIN ref r ON p.uai = r.uai", ["a", "b"]),
])
def test_accepted_queries_and_where_they_run(sql: str, nodes: list[str]) -> None:
    checked = _check(sql)
    assert checked.participants[0] == nodes


def test_nodes_missing_a_joined_table_are_named_as_left_out() -> None:
    checked = _check("SELECT COUNT(*) FROM pupils p JOIN only_b o ON p.uai = o.uai")
    assert checked.participants == (["b"], ["a"])


def test_tier_is_the_strictest_of_the_tables() -> None:
    assert _check("SELECT COUNT(*) FROM pupils p JOIN ref r ON p.uai = r.uai").tier == \
        "restricted"
    assert _check("SELECT COUNT(*) FROM open_rows").tier == "open"
