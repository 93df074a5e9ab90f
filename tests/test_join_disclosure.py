"""Disclosure control across joins (review of the reference tables): the minimum count is
a count of *units* of every restricted table a cell draws on, whatever the join order or
fan-out; a reference table on the preserved side of a LEFT JOIN is not counted at every
node; merged keys -0.0/0.0 are one group; row order says nothing about empty cells."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from federation._certs import make_certs
from federation._errors import QueryError
from tests._federation import Federation, start_federation

SCHOOLS = [f"S{i:02d},R{1 + i // 10}" for i in range(30)]  # regions R1, R2, R3


def _csv(path: Path, header: str, rows: list[str]) -> str:
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("joins")
    certs = make_certs(tmp / "certs", ["ref", "a", "b"])
    schools = _csv(tmp / "schools.csv", "school_id,region", SCHOOLS)
    # 3 pupils in region R1 with 4 rows each (12 rows); 12 and 30 pupils in R2 and R3
    pupils = [f"P{p},S0{p},10,{s}" for p in range(3) for s in "abcd"]
    pupils += [f"Q{p},S1{p % 10},5,a" for p in range(12)]
    pupils += [f"T{p},S2{p % 10},7,a" for p in range(30)]
    # one pupil in a table without a privacy unit, joined to a 10-row reference per key
    single = ["S00,17"]
    visits_a = [f"a{i},S0{i},1" for i in range(5)]
    visits_b = [f"b{i},S1{i},1" for i in range(5)]
    nodes = {
        "ref": [{"table": "schools", "source": schools, "tier": "open", "shared": True},
                {"table": "regions", "tier": "open", "shared": True, "source": _csv(
                    tmp / "regions.csv", "school_id,zone", [f"S00,Z{i}" for i in range(10)])}],
        "a": [{"table": "pupils", "tier": "restricted", "privacy_unit": "pid",
               "min_count": 10, "source": _csv(tmp / "pupils.csv",
                                               "pid,school_id,grade,subject", pupils)},
              {"table": "marks", "tier": "restricted", "min_count": 10,
               "source": _csv(tmp / "marks.csv", "school_id,mark", single)},
              {"table": "visits", "tier": "open",
               "source": _csv(tmp / "va.csv", "vid,school_id,v", visits_a)}],
        "b": [{"table": "visits", "tier": "open",
               "source": _csv(tmp / "vb.csv", "vid,school_id,v", visits_b)}],
    }
    (tmp / "fed").mkdir()
    f = start_federation(tmp / "fed", certs, nodes)
    f.coordinator.catalog(refresh=True)
    yield f
    f.close()


@pytest.mark.parametrize("sql", [
    # the reference table first: the count of joined rows is 12 for 3 pupils
    "SELECT s.region, COUNT(*) AS n, SUM(p.grade) AS g FROM schools s "
    "JOIN pupils p USING (school_id) GROUP BY s.region ORDER BY s.region",
    "SELECT s.region, COUNT(*) AS n FROM pupils p JOIN schools s USING (school_id) "
    "GROUP BY s.region ORDER BY s.region",
    # null-extended rows of empty schools are not units
    "SELECT s.region, COUNT(p.pid) AS n, SUM(p.grade) AS g FROM schools s "
    "LEFT JOIN pupils p USING (school_id) GROUP BY s.region ORDER BY s.region",
])
def test_cells_count_units_not_joined_rows(fed: Federation, sql: str) -> None:
    out = fed.run(sql)
    cells = {r[0]: (r[1:], s[1:]) for r, s in zip(out["rows"], out["suppressed"],
                                                   strict=True)}
    if "R1" in cells:  # 3 pupils < 10: withheld (or hidden with its key: not a domain)
        values, marks = cells["R1"]
        assert all(marks) and all(v is None for v in values), out
    else:
        assert out["hidden_cells"] >= 1, out
    # the others: released with their number of pupils, or withheld to protect R1
    # (secondary suppression); never a count of joined rows
    released = {k: v[0][0] for k, v in cells.items() if not any(v[1])}
    assert released and set(released.values()) <= {12, 30}, out


def test_fan_out_of_a_table_without_unit_is_not_counted(fed: Federation) -> None:
    # one row of `marks`, joined to 10 rows of a reference: one unit, not ten
    out = fed.run("SELECT COUNT(*) AS n, SUM(m.mark) AS total FROM marks m "
                  "JOIN regions r USING (school_id)")
    assert out["rows"] == [[None, None]] and out["suppressed"] == [[True, True]]


def test_left_join_from_a_reference_over_several_nodes_is_refused(fed: Federation) -> None:
    sql = ("SELECT s.region, COUNT(*) AS n, COUNT(v.vid) AS nv FROM schools s "
           "LEFT JOIN visits v USING (school_id) GROUP BY s.region ORDER BY s.region")
    with pytest.raises(QueryError) as err:
        fed.run(sql)
    assert err.value.code == "not_allowed"
    assert "visits" in err.value.message and "first" in err.value.message
    # the partitioned table first: each visit is counted once, at its node
    out = fed.run("SELECT s.region, COUNT(*) AS n FROM visits v LEFT JOIN schools s "
                  "USING (school_id) GROUP BY s.region ORDER BY s.region")
    assert out["rows"] == [["R1", 5], ["R2", 5]] and out["nodes"] == ["a", "b"]


def test_signed_zero_keys_merge_into_one_group(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a", "b"])
    rows_a = [f"u{i},-0.0" for i in range(3)]  # node a holds -0.0, node b 0.0
    rows_b = [f"w{i},0.0" for i in range(12)]
    nodes = {n: [{"table": "t", "tier": "restricted", "privacy_unit": "unit",
                  "min_count": 0, "schema": {"x": "DOUBLE"},
                  "source": _csv(tmp_path / f"{n}.csv", "unit,x", rows)}]
             for n, rows in (("a", rows_a), ("b", rows_b))}
    (tmp_path / "fed").mkdir()
    f = start_federation(tmp_path / "fed", certs, nodes)
    try:
        out = f.run("SELECT x, COUNT(*) AS n FROM t GROUP BY x")
        assert len(out["rows"]) == 1 and out["rows"][0][1] == 15, out
    finally:
        f.close()


def test_order_of_suppressed_cells_does_not_tell_empty_ones(tmp_path: Path) -> None:
    """Keys of a public domain come back in key order from the node, whichever held data:
    with ties on the ORDER BY value, the group keys decide."""
    certs = make_certs(tmp_path / "certs", ["a"])
    rows = [f"p{i},S7" for i in range(20)] + [f"q{i},S3" for i in range(2)] \
        + [f"r{i},S1" for i in range(15)] + [f"s{i},S5" for i in range(12)]
    nodes = {"a": [{"table": "t", "tier": "restricted", "privacy_unit": "unit",
                    "min_count": 5, "source": _csv(tmp_path / "t.csv", "unit,school", rows),
                    "public_domains": {"school": [f"S{i}" for i in range(10)]}}]}
    (tmp_path / "fed").mkdir()
    f = start_federation(tmp_path / "fed", certs, nodes)
    try:
        for sql in ("SELECT school, COUNT(*) AS n FROM t GROUP BY school",
                    "SELECT school, COUNT(*) AS n FROM t GROUP BY school ORDER BY n DESC"):
            out = f.run(sql)
            hidden = [r[0] for r in out["rows"] if r[1] is None]
            assert hidden == sorted(hidden), (sql, out["rows"])  # S0 S2 S3 S4 S5 S6 …
            assert {"S0", "S3", "S5"} <= set(hidden)  # suppressed: present or empty
        union = duckdb.connect().sql(f"SELECT count(*) FROM read_csv('{tmp_path / 't.csv'}')")
        assert union.fetchall()[0][0] == 49
    finally:
        f.close()
