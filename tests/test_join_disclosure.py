"""Disclosure control across joins (review of the reference tables): the threshold is on
the number of *units* of the restricted table a cell draws on, whatever the join order or
fan-out; a reference table on the preserved side of a LEFT JOIN is not counted at every
node; merged keys -0.0/0.0 are one group; row order says nothing about empty cells.

``pupils`` is released exactly (``cell_key.perturb = false``, a test-only setting) where a
test checks values; ``pupils_p`` is the same data perturbed by the cell key method, as a
node releases it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from federation._certs import make_certs
from federation._errors import QueryError
from privacy import CkmParams
from tests._federation import Federation, start_federation

D = CkmParams().max_perturbation  # no dataset here sets cell_key: the defaults
MU = CkmParams().magnitude
EXACT = {"perturb": False}

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
               "min_count": 10, "cell_key": EXACT, "source": _csv(
                   tmp / "pupils.csv", "pid,school_id,grade,subject", pupils)},
              {"table": "pupils_p", "tier": "restricted", "privacy_unit": "pid",
               "min_count": 10, "source": str(tmp / "pupils.csv")},
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


@pytest.mark.parametrize("pupils", ["pupils", "pupils_p"])
@pytest.mark.parametrize("sql", [
    # the reference table first: the count of joined rows is 12 for 3 pupils
    "SELECT s.region, COUNT(*) AS n, SUM(p.grade) AS g FROM schools s "
    "JOIN {pupils} p USING (school_id) GROUP BY s.region ORDER BY s.region",
    "SELECT s.region, COUNT(*) AS n FROM {pupils} p JOIN schools s USING (school_id) "
    "GROUP BY s.region ORDER BY s.region",
    # null-extended rows of empty schools are not units
    "SELECT s.region, COUNT(p.pid) AS n, SUM(p.grade) AS g FROM schools s "
    "LEFT JOIN {pupils} p USING (school_id) GROUP BY s.region ORDER BY s.region",
])
def test_cells_count_units_not_joined_rows(fed: Federation, sql: str, pupils: str) -> None:
    out = fed.run(sql.format(pupils=pupils))
    cells = {r[0]: (r[1:], s[1:]) for r, s in zip(out["rows"], out["suppressed"],
                                                   strict=True)}
    # R1: 3 pupils (12 rows) < 10, perturbed or not (3 + D < 10): withheld, and since
    # `region` has no public domain, its key is not even named — with nothing that counts it
    assert 3 + D < 10
    if "R1" in cells:
        values, marks = cells["R1"]
        assert all(marks) and all(v is None for v in values), out
    assert out["hidden_cells"] == 0 and not any("withheld" in n for n in out["notes"]), out
    released = {k: v[0] for k, v in cells.items() if not any(v[1])}
    truth = {"R2": (12, 12 * 5), "R3": (30, 30 * 7)}  # pupils, Σ grade (one row each)
    if pupils == "pupils":  # exact: the number of pupils, never of joined rows
        width = len(out["columns"]) - 1
        assert released == {k: list(t[:width]) for k, t in truth.items()}, out
        return
    # perturbed: R3 (30 − D ≥ 10) is always released, R2 (12) may fall under the threshold
    assert "R3" in released and set(released) <= {"R2", "R3"}, out
    # a magnitude moves by μ·B·v, |v| ≤ 1.5, B the most one pupil adds: the grade's
    # envelope (max 10 → 16) times the most rows a pupil has (4, the P pupils)
    bound = 16 * 4
    for region, values in released.items():
        n = values[0]
        assert isinstance(n, int) and abs(n - truth[region][0]) <= D * 4, out
        if len(values) > 1:
            assert abs(values[1] - truth[region][1]) <= MU * bound * 1.5 + 0.5, out


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
    nodes = {n: [{"table": table, "tier": "restricted", "privacy_unit": "unit",
                  "min_count": 0, "schema": {"x": "DOUBLE"}, "cell_key": cell_key,
                  "source": _csv(tmp_path / f"{n}.csv", "unit,x", rows)}
                 for table, cell_key in (("t", EXACT), ("tp", {}))]
             for n, rows in (("a", rows_a), ("b", rows_b))}
    (tmp_path / "fed").mkdir()
    f = start_federation(tmp_path / "fed", certs, nodes)
    try:
        out = f.run("SELECT x, COUNT(*) AS n FROM t GROUP BY x")
        assert len(out["rows"]) == 1 and out["rows"][0][1] == 15, out
        # perturbed: still one group, each node's part within D of its own count
        out = f.run("SELECT x, COUNT(*) AS n FROM tp GROUP BY x")
        assert len(out["rows"]) == 1 and abs(out["rows"][0][1] - 15) <= 2 * D, out
    finally:
        f.close()


def test_order_of_suppressed_cells_does_not_tell_empty_ones(tmp_path: Path) -> None:
    """Keys of a public domain come back in key order from the node, whichever held data:
    with ties on the ORDER BY value, the group keys decide. Perturbed, threshold 10."""
    certs = make_certs(tmp_path / "certs", ["a"])
    rows = [f"p{i},S7" for i in range(20)] + [f"q{i},S3" for i in range(2)] \
        + [f"r{i},S1" for i in range(15)] + [f"s{i},S5" for i in range(4)]
    domain = [f"S{i}" for i in range(10)]
    nodes = {"a": [{"table": "t", "tier": "restricted", "privacy_unit": "unit",
                    "min_count": 10, "source": _csv(tmp_path / "t.csv", "unit,school", rows),
                    "public_domains": {"school": domain}}]}
    truth = dict(duckdb.connect().sql(
        f"SELECT school, count(*) FROM read_csv('{tmp_path / 't.csv'}') GROUP BY 1").fetchall())
    # whatever the record keys: below 10 even when perturbed up by D, or above when down
    always_hidden = sorted(s for s in domain if truth.get(s, 0) + D < 10)
    always_shown = {s for s in domain if truth.get(s, 0) - D >= 10}
    assert always_hidden == ["S0", "S2", "S3", "S4", "S5", "S6", "S8", "S9"]
    assert always_shown == {"S1", "S7"}  # S3 (2 pupils) and S5 (4) among empty ones
    (tmp_path / "fed").mkdir()
    f = start_federation(tmp_path / "fed", certs, nodes)
    try:
        answers = []
        for sql, order in (("SELECT school, COUNT(*) AS n FROM t GROUP BY school", None),
                           ("SELECT school, COUNT(*) AS n FROM t GROUP BY school "
                            "ORDER BY n DESC", "n")):
            out = f.run(sql)
            hidden = [r[0] for r in out["rows"] if r[1] is None]
            assert hidden == always_hidden, (sql, out["rows"])  # key order: S0 S2 S3 S4 …
            if order is None:  # every key of the domain, in key order
                assert [r[0] for r in out["rows"]] == domain
            else:  # the values first, then the "< k" cells in key order (NULLS LAST)
                assert [r[0] for r in out["rows"][-len(hidden):]] == hidden
            assert out["hidden_cells"] == 0 and out["suppressed_cells"] == len(hidden)
            answers.append({r[0]: r[1] for r in out["rows"]})
        assert answers[0] == answers[1]
    finally:
        f.close()
