"""Dummy data (issue 17): tables and answers drawn from public metadata only, on a real
federation whose nodes count the plans they execute."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enclave import BulleError, connect
from federation._api import build_app
from federation._config import ProjectConfig
from federation._dummy import dummy_table, null_rate, run_dummy
from federation._errors import QueryError
from privacy import Grant, generate_board_keys, sign_grant
from tests._federation import OTHER_TOKEN, TOKEN, Federation, start_federation
from tests.conftest import MODULES, oulad, uci
from tests.test_api import ServerThread
from tests.test_precision import pupils

BOUNDS = {"g3": [0, 20], "absences": [0, 93]}


def bounded_uci(school: str) -> list[dict]:
    return [{**ds, "bounds": BOUNDS} for ds in uci(school)]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("dummy")
    generate_board_keys(tmp)
    now = datetime.now(UTC)
    grant = Grant("demo", ("alice",), ("pupils",), 100.0, 1e-6, now + timedelta(days=1),
                  "testing dummy data", now)
    (tmp / "demo.grant").write_text(sign_grant(grant, (tmp / "board_ed25519.pem").read_bytes()))
    nodes = {"gp": bounded_uci("GP") + pupils("GP"), "ms": bounded_uci("MS") + pupils("MS"),
             "v1": oulad(MODULES["v1"])}
    fed = start_federation(tmp, certs, nodes, board_public_key=tmp / "board_ed25519.pub.pem",
                           projects=(ProjectConfig("demo", tmp / "demo.grant", 0.5),))
    yield fed
    fed.close()


@pytest.fixture(scope="module")
def hub(fed) -> Iterator:
    with ServerThread(build_app(fed.coordinator)) as base:
        yield connect(base, TOKEN)


@pytest.mark.parametrize("table", ["lycee_students", "student_info", "pupils", "courses"])
def test_no_dummy_value_outside_the_public_metadata(fed, table) -> None:
    meta = fed.coordinator.catalog()[table]
    data = dummy_table(meta, rows=2000, seed=3).to_pydict()
    assert list(data) == list(meta.columns)
    for col, values in data.items():
        present = [v for v in values if v is not None]
        if col in meta.public_domains:
            assert {str(v) for v in present} <= set(meta.public_domains[col]), col
        elif col in meta.bounds:
            lo, hi = meta.bounds[col]
            assert all(lo <= v <= hi for v in present), col
        elif isinstance(present[0], str):  # no public values: placeholders only
            assert all(v.startswith(f"{col}_") for v in present), col
        else:
            assert all(0 <= v <= 100 for v in present), col
        # nulls at the published completeness, rounded to 5 points
        assert abs(values.count(None) / 2000 - null_rate(meta, col)) < 0.03, col
    assert dummy_table(meta, 50, seed=3) == dummy_table(meta, 50, seed=3)


def test_dummy_nulls_follow_the_quality_report(fed) -> None:
    meta = fed.coordinator.catalog()["student_info"]
    assert null_rate(meta, "imd_band") == 0.05  # 3.4% missing at v1, rounded to 5 points
    assert null_rate(meta, "gender") == 0.0


def test_sdk_dummy_matches_describe(hub) -> None:
    df = hub.dummy("lycee_students", rows=300, seed=1)
    described = hub.describe("lycee_students")
    assert list(df.columns) == described["name"].tolist() and len(df) == 300
    types = dict(zip(described["name"], described["type"], strict=True))
    for col in df.columns:
        expected = {"BIGINT": "Int64", "INTEGER": "Int64", "DOUBLE": "float64",
                    "VARCHAR": "object"}.get(types[col])
        assert expected is None or str(df[col].dtype) == expected, (col, df[col].dtype)
    assert set(df["sex"].dropna()) <= {"F", "M"} and df["g3"].between(0, 20).all()
    assert df.bulle.meta["dummy"] and "never from rows" in df.bulle.notes[0]
    assert df.equals(hub.dummy("lycee_students", rows=300, seed=1))
    with pytest.raises(BulleError) as err:
        hub.dummy("no_such_table")
    assert err.value.code == "unknown_table"


def test_dummy_query_sends_nothing_and_charges_nothing(fed, hub) -> None:
    sql = ("SELECT sex, COUNT(*) AS n, AVG(g3) AS mean, SUM(absences) AS absences "
           "FROM lycee_students WHERE age < 18 GROUP BY sex ORDER BY sex")
    executed = fed.executed
    spent = fed.coordinator.projects.budget("demo").spent
    df = hub.sql(sql, dummy=True, progress=False)
    dp = hub.sql("SELECT sex, COUNT(*) AS n, AVG(g3) AS mean FROM pupils GROUP BY sex",
                 dummy=True, epsilon=5.0, progress=False)
    rows = hub.sql("SELECT code_module, module_presentation_length AS days FROM courses "
                   "ORDER BY days DESC LIMIT 3", dummy=True, progress=False)
    join = hub.sql("SELECT a.assessment_type, COUNT(*) AS n FROM student_assessment sa "
                   "JOIN assessments a USING (id_assessment) GROUP BY 1", dummy=True,
                   progress=False)
    assert list(join.columns) == ["assessment_type", "n"] and join["n"].sum() > 0
    assert fed.executed == executed  # no plan reached a node
    assert fed.coordinator.projects.budget("demo").spent == spent  # no ε spent
    assert df.bulle.epsilon_spent == 0 and dp.bulle.epsilon_spent == 0
    # the same shape as the real answer: columns, types, keys, and the dummy note
    real = hub.sql(sql, progress=False)
    assert list(df.columns) == list(real.columns)
    assert [str(t) for t in df.dtypes] == [str(t) for t in real.dtypes]
    assert df["sex"].tolist() == ["F", "M"] and df["mean"].between(0, 20).all()
    assert "dummy data" in df.bulle.notes[0] and df.bulle.nodes == ["gp", "ms"]
    assert list(dp.columns) == ["sex", "n", "mean"] and dp["mean"].between(0, 20).all()
    assert any("Laplace" in n for n in dp.bulle.notes)
    assert list(rows.columns) == ["code_module", "days"] and len(rows) == 3
    assert rows["days"].is_monotonic_decreasing


def test_dummy_query_is_refused_like_the_real_one(fed, hub) -> None:
    executed = fed.executed
    with pytest.raises(BulleError) as err:  # row output from a restricted table
        hub.sql("SELECT * FROM lycee_students", dummy=True, progress=False)
    assert err.value.code == "not_allowed"
    with pytest.raises(BulleError) as err:  # the DP shape rules
        hub.sql("SELECT SUM(absences) FROM pupils", dummy=True, progress=False)
    assert "declared bounds" in str(err.value)
    assert fed.executed == executed


def test_sensitive_dummy_needs_the_grant(fed, hub) -> None:
    other = connect(hub.url, OTHER_TOKEN)
    with pytest.raises(BulleError) as err:
        other.dummy("pupils")
    assert err.value.code == "forbidden"
    with pytest.raises(QueryError) as qerr:
        run_dummy(fed.coordinator, "SELECT COUNT(*) FROM pupils", fed.other, None)
    assert qerr.value.code == "no_grant"
    assert len(hub.dummy("pupils", rows=10)) == 10
