"""The node's compile steps (nodes/_compile.py: checks, then the restricted or sensitive
step) on plain data: table metadata in, SQL or a refusal out; no servers."""

from __future__ import annotations

import duckdb
import pytest

from federation._planner import plan_query
from federation._sql import parse
from federation._tree import Col, to_proto
from federation.proto import bulle_pb2 as pb
from nodes._compile import PlanRefused, TableMeta, compile_plan
from nodes._restricted import MAX_GROUPS, RECORD_KEY

COLUMNS = {"pid": "VARCHAR", "uai": "VARCHAR", "sex": "VARCHAR", "g3": "BIGINT",
           "passed": "INTEGER"}


def _meta(name: str, **kw: object) -> TableMeta:
    defaults: dict[str, object] = {
        "tier": "restricted", "columns": COLUMNS, "privacy_unit": "pid",
        "public_domains": {"sex": ("F", "M")}, "min_count": 5, "round_to": 1,
        "max_unit_rows": 1, "bounds": {"g3": (0.0, 20.0), "passed": (0.0, 1.0)}}
    return TableMeta(name, **{**defaults, **kw})  # type: ignore[arg-type]


CATALOG = {
    "pupils": _meta("pupils"),
    "marks": _meta("marks", max_unit_rows=3),
    "schools": _meta("schools", unit_level="institution", privacy_unit="uai"),
    "ref": _meta("ref", tier="open", privacy_unit="", public_domains={}),
}


def _plan(sql: str) -> pb.Plan:
    schema = {n: m.columns for n, m in CATALOG.items()}
    return plan_query(parse(sql, schema)).plan


def test_order_statistics_refused_on_persons_allowed_on_institutions() -> None:
    with pytest.raises(PlanRefused, match="MIN and MAX are not released on 'pupils'"):
        compile_plan(_plan("SELECT MAX(g3) FROM pupils"), CATALOG, 100)
    compiled = compile_plan(_plan("SELECT MIN(g3), MAX(g3) FROM schools"), CATALOG, 100)
    assert compiled.restricted is not None and compiled.tier == "restricted"


def test_one_row_per_unit_skips_the_per_unit_step() -> None:
    one = compile_plan(_plan("SELECT sex, SUM(g3) FROM pupils GROUP BY sex"), CATALOG, 100)
    many = compile_plan(_plan("SELECT sex, SUM(g3) FROM marks GROUP BY sex"), CATALOG, 100)
    per_unit = "GROUP BY \"g0\", __unit"
    assert per_unit not in one.sql and "GROUP BY \"g0\"" in one.sql
    assert per_unit in many.sql  # several rows per unit: summed per unit first
    joined = compile_plan(_plan("SELECT COUNT(*) FROM pupils p JOIN ref r ON p.uai = r.uai"),
                          CATALOG, 100)
    assert "GROUP BY __unit" in joined.sql  # a join may repeat a unit's rows


def _marks(rows: str) -> duckdb.DuckDBPyConnection:
    """The ``marks`` table of CATALOG in a DuckDB, with its record keys, holding ``rows``."""
    con = duckdb.connect()
    con.execute(f"CREATE TABLE marks (pid VARCHAR, uai VARCHAR, sex VARCHAR, g3 BIGINT, "
                f"{RECORD_KEY} UINTEGER)")
    con.execute(f"INSERT INTO marks VALUES {rows}")
    return con


def test_the_per_unit_sql_runs_and_counts_units_not_rows() -> None:
    con = _marks("('p1', 'u', 'F', 10, 7), ('p1', 'u', 'F', 12, 7), ('p2', 'u', 'F', 15, 9), "
                 "('p3', 'u', 'M', 8, 11)")
    compiled = compile_plan(_plan("SELECT sex, COUNT(*) AS n, SUM(g3) AS s FROM marks "
                                  "GROUP BY sex"), CATALOG, 100)
    rows = {r["g0"]: r for r in con.sql(compiled.sql).to_arrow_table().to_pylist()}
    assert compiled.aggregates == (("p0", pb.COUNT_ROWS), ("p1", pb.SUM))
    assert rows["F"]["__n"] == 2 and rows["F"]["p0"] == 3 and rows["F"]["p1"] == 37
    assert rows["F"]["__k"] == (7 + 9) % (1 << 32)  # the cell key: units, not rows
    # static noise scales: a unit adds at most 3 rows (max_unit_rows), each g3 ≤ 20
    assert compiled.restricted is not None
    assert compiled.restricted.noise == ((3.0, True), (60.0, False))
    assert {"__v1"} <= set(rows["F"]) and "__v0" not in rows["F"]  # value key: magnitudes


def test_arguments_are_clamped_to_their_bounds_per_row_and_per_unit() -> None:
    """A value outside the declared bounds, or a unit with more rows than any unit had at
    load (as a join can make), adds no more than the bounds allow."""
    con = _marks("('p1', 'u', 'F', 500, 7), ('p2', 'u', 'F', 20, 9), ('p2', 'u', 'F', 20, 9), "
                 "('p2', 'u', 'F', 20, 9), ('p2', 'u', 'F', 20, 9)")
    compiled = compile_plan(_plan("SELECT sex, COUNT(*) AS n, SUM(g3) AS s FROM marks "
                                  "GROUP BY sex"), CATALOG, 100)
    row = con.sql(compiled.sql).to_arrow_table().to_pylist()[0]
    assert (row["p0"], row["p1"]) == (1 + 3, 20 + 60)


@pytest.mark.parametrize(("agg", "noise"), [
    ("SUM(g3)", {(20.0, False)}),
    ("SUM(g3 + 1000)", {(1020.0, False)}),  # an offset makes the noise larger
    ("SUM(CASE WHEN pid = 'x' THEN g3 * 50 ELSE 0 END)", {(1000.0, False)}),
    ("SUM(-g3)", {(20.0, False)}),
    ("SUM(CASE WHEN g3 >= 10 THEN 1 ELSE 0 END)", {(1.0, True)}),  # a count however written
    ("SUM(CAST(g3 >= 10 AS INTEGER))", {(1.0, True)}),
    ("COUNT(g3)", {(1.0, True)}),
    ("SUM(passed)", {(1.0, True)}),  # an integer column bounded within [0, 1] counts
    ("AVG(passed)", {(1.0, True)}),
    ("AVG(g3)", {(20.0, False), (1.0, True)}),  # SUM(g3) and COUNT(g3)
])
def test_noise_scales_come_from_the_plan_and_the_bounds(agg: str, noise: set) -> None:
    compiled = compile_plan(_plan(f"SELECT {agg} FROM pupils"), CATALOG, 100)
    assert compiled.restricted is not None
    assert set(compiled.restricted.noise) == noise


@pytest.mark.parametrize("agg", ["SUM(length(pid))", "SUM(g3 / 2)", "AVG(ln(g3))",
                                 "SUM(CASE WHEN g3 > 1 THEN length(uai) ELSE 0 END)"])
def test_arguments_without_a_static_bound_are_refused(agg: str) -> None:
    with pytest.raises(PlanRefused, match="static bound"):
        compile_plan(_plan(f"SELECT {agg} FROM pupils"), CATALOG, 100)


def test_the_record_key_column_cannot_be_named() -> None:
    plan = _plan("SELECT COUNT(*) FROM pupils")
    plan.where.CopyFrom(to_proto(Col("pupils", RECORD_KEY)))
    with pytest.raises(PlanRefused, match="not in table"):
        compile_plan(plan, CATALOG, 100)


def test_public_domains_too_large_for_one_release_are_refused() -> None:
    big = {"sex": tuple(f"s{i}" for i in range(400)), "uai": tuple(f"u{i}" for i in range(400))}
    catalog = {"pupils": _meta("pupils", public_domains=big)}
    plan = plan_query(parse("SELECT sex, uai, COUNT(*) FROM pupils GROUP BY sex, uai",
                            {"pupils": COLUMNS})).plan
    assert MAX_GROUPS < 400 * 400
    with pytest.raises(PlanRefused, match="cells"):
        compile_plan(plan, catalog, 100)
