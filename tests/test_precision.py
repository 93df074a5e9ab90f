"""Precision first (issue 17): price a DP query by the precision wanted, then run it at that ε.

The formula is checked on plain data (seeded draws); the price on a real federation (two
nodes, each adding its own Laplace noise) by the empirical coverage of ±h over many cells.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from enclave import BulleError, connect
from federation._api import build_app
from federation._config import ProjectConfig
from federation._dashboard import summary
from federation._errors import QueryError
from federation._precision import (
    coverage,
    epsilon_each_for,
    laplace_sum_coverage,
    rounded_laplace_sum_coverage,
)
from federation.proto import bulle_pb2 as pb
from privacy import Grant, generate_board_keys, sign_grant
from tests._federation import DATA, TOKEN, Federation, start_federation
from tests.conftest import uci
from tests.test_api import ServerThread

POR = DATA / "uci-student-performance" / "student-por.csv"
AGES = list(range(15, 23))


def pupils(school: str) -> list[dict]:
    """The UCI pupils of one school as a sensitive table, one row per pupil (no
    contribution bounding drops rows, so the noise is the only error)."""
    return [{"table": "pupils", "source": str(POR), "filter": f"school = '{school}'",
             "tier": "sensitive", "privacy_unit": "row", "bounds": {"g3": [0, 20]},
             "public_domains": {"sex": ["F", "M"], "age": AGES, "studytime": [1, 2, 3, 4]}}]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("precision")
    generate_board_keys(tmp)
    now = datetime.now(UTC)
    grant = Grant("demo", ("alice",), ("pupils",), 1e6, 1e-6, now + timedelta(days=1),
                  "testing precision-first pricing", now)
    (tmp / "demo.grant").write_text(sign_grant(grant, (tmp / "board_ed25519.pem").read_bytes()))
    fed = start_federation(tmp, certs, {"gp": pupils("GP") + uci("GP")[:1],
                                        "ms": pupils("MS")},
                           board_public_key=tmp / "board_ed25519.pub.pem",
                           projects=(ProjectConfig("demo", tmp / "demo.grant", 0.5),))
    yield fed
    fed.close()


@pytest.fixture(scope="module")
def url(fed) -> Iterator[str]:
    with ServerThread(build_app(fed.coordinator)) as base:
        yield base


# -- the formula, on plain data ---------------------------------------------------------

def test_closed_forms_match_seeded_draws() -> None:
    rng = np.random.default_rng(17)
    draws = 400_000
    for n, b, h in ((1, 2.0, 5.0), (2, 2.0, 7.0), (3, 0.7, 2.0), (6, 5.0, 30.0)):
        noise = rng.laplace(0.0, b, (draws, n))
        tol = 4 * math.sqrt(0.25 / draws)
        assert laplace_sum_coverage(h, b, n) == pytest.approx(
            np.mean(np.abs(noise.sum(1)) <= h), abs=tol)
        assert rounded_laplace_sum_coverage(h, [b] * n) == pytest.approx(
            np.mean(np.abs(np.round(noise).sum(1)) <= h), abs=tol)
    # n = 1 is Laplace's own quantile: P(|L| <= b ln 20) = 0.95
    assert laplace_sum_coverage(3.0 * math.log(20), 3.0, 1) == pytest.approx(0.95)
    # different scales: counts exactly, by convolution of the two laws
    a, b = rng.laplace(0, 3.0, draws), rng.laplace(0, 1.0, draws)
    assert rounded_laplace_sum_coverage(4.0, [3.0, 1.0]) == pytest.approx(
        np.mean(np.abs(np.round(a) + np.round(b)) <= 4), abs=4 * math.sqrt(0.25 / draws))
    # sums with different scales: conservative (every node at the largest scale)
    assert coverage(pb.SUM, 4.0, [3.0, 1.0]) <= np.mean(np.abs(a + b) <= 4)


def test_epsilon_is_the_smallest_that_meets_the_level() -> None:
    for kind, h, sens in ((pb.COUNT_ROWS, 10, [1.0, 1.0]), (pb.SUM, 100, [20.0, 20.0]),
                          (pb.COUNT, 0.5, [1.0, 1.0, 1.0]), (pb.SUM_SQUARES, 50, [4.0, 9.0])):
        eps = epsilon_each_for(kind, h, sens)
        assert coverage(kind, h, [d / eps for d in sens]) >= 0.95
        assert coverage(kind, h, [d / (eps * 0.999) for d in sens]) < 0.95
    # one node: Laplace's quantile b·ln 20 = h gives ε = Δ·ln 20 / h
    assert epsilon_each_for(pb.SUM, 10.0, [5.0]) == pytest.approx(5 * math.log(20) / 10,
                                                                 rel=1e-5)
    with pytest.raises(ValueError):
        epsilon_each_for(pb.SUM, 0.0, [1.0])


# -- on a real federation ----------------------------------------------------------------

COUNT_SQL = "SELECT age, sex, studytime, COUNT(*) AS n FROM pupils GROUP BY 1, 2, 3"
SUM_SQL = "SELECT age, sex, studytime, SUM(g3) AS total FROM pupils GROUP BY 1, 2, 3"


def _truth(union_db, expr: str) -> dict[tuple, float]:
    rows = union_db.execute(
        f"SELECT age, sex, studytime, {expr} FROM lycee_students GROUP BY ALL").fetchall()
    return {tuple(r[:3]): float(r[3]) for r in rows}


@pytest.mark.parametrize(("sql", "expr", "h"), [(COUNT_SQL, "count(*)", 6.0),
                                                (SUM_SQL, "sum(g3)", 80.0)])
def test_price_then_run_covers_the_asked_precision(fed, union_db, sql, expr, h) -> None:
    """Price at ±h, run at that ε many times: the released cells (64 per query, two nodes'
    noises each) fall within ±h of the truth in ≥ 95% of cases, up to a tolerance of 4
    binomial sds (the nodes' noise comes from OpenDP's unseedable sampler, so the seed is
    the fixed data and query set). Cells whose truth is far from 0 (where the clamp at 0
    cannot help) are within 4 sds of exactly 95%. Pricing as if one node added all the
    noise (b = h / ln 20) covers ±h only 89.7% (counts, ±6) and 87.5% (sums, ±80) of the
    time with two nodes, below the 91.4% floor of the far cells: this test fails on it."""
    spent, executed = fed.coordinator.projects.budget("demo").spent, fed.executed
    priced = fed.coordinator.price(sql, fed.researcher, None, h)
    assert fed.executed == executed  # pricing sends nothing to the nodes
    assert fed.coordinator.projects.budget("demo").spent == spent  # and charges nothing
    assert priced["nodes"] == ["gp", "ms"] and priced["epsilon_charged"] == pytest.approx(
        2 * priced["epsilon"])  # not disjoint: ε per node taking part
    truth = _truth(union_db, expr)
    inside, total, big_in, big = 0, 0, 0, 0
    widths = []
    for _ in range(40):
        out = fed.coordinator.run(sql, fed.researcher, precision=h)
        assert out["epsilon_spent"] == pytest.approx(2 * priced["epsilon"])
        assert out["precision"]["precision"] == h
        for row in out["rows"]:
            err = abs(row[3] - truth.get(tuple(row[:3]), 0.0))
            inside += err <= h
            total += 1
            if truth.get(tuple(row[:3]), 0.0) > 3 * h:  # far from the clamp at 0
                big_in += err <= h
                big += 1
        widths += [(hi[3] - lo[3]) / 2 for lo, hi, row in
                   zip(out["ci_low"], out["ci_high"], out["rows"], strict=True) if row[3] > 3 * h]
    assert total == 40 * 64
    tol = 4 * math.sqrt(0.95 * 0.05 / total)
    print(f"coverage of ±{h:g}: {inside / total:.4f} over {total} cells, "
          f"{big_in / big:.4f} over {big} cells far from 0 (ε={priced['epsilon']:.4g})")
    assert inside / total >= 0.95 - tol, (inside / total, priced)
    # exact, not merely conservative: where the clamp at 0 plays no part, about 95%
    assert big >= 400
    # the interval the result reports is the exact one: within ±h, and barely below it
    assert max(widths) <= h and min(widths) >= 0.9 * h, (min(widths), max(widths))
    assert abs(big_in / big - 0.95) <= 4 * math.sqrt(0.95 * 0.05 / big), (big_in / big, priced)


def test_average_states_its_assumption(fed) -> None:
    sql = "SELECT sex, COUNT(*) AS n, AVG(g3) AS mean FROM pupils GROUP BY sex"
    priced = fed.coordinator.price(sql, fed.researcher, None, 40.0)
    # COUNT(*), and AVG's sum and count: three partials sharing ε
    assert [p["kind"] for p in priced["partials"]] == ["count", "sum", "count"]
    assert priced["partials"][1]["name"] == "mean"
    assert any("mean: computed from several partials" in n for n in priced["notes"])
    out = fed.coordinator.run(sql, fed.researcher, precision=40.0)
    assert any("numerator and denominator" in n for n in out["notes"])
    assert out["epsilon_spent"] == pytest.approx(2 * priced["epsilon"])
    entry = [e for e in fed.coordinator.projects.audit.entries("demo")
             if e.action == "released"][-1]
    assert entry.detail["precision"] == 40.0  # the board sees the precision asked for
    assert entry.detail["epsilon"] == pytest.approx(2 * priced["epsilon"])
    board = summary(fed.coordinator)["releases"]
    assert board[-1]["precision"] == 40.0 and board[-1]["epsilon"] == entry.detail["epsilon"]


def test_price_refusals_are_clear_and_free(fed) -> None:
    spent = fed.coordinator.projects.budget("demo").spent
    with pytest.raises(QueryError) as err:
        fed.coordinator.price("SELECT SUM(g3) FROM pupils", fed.researcher, None, 1e-3)
    assert err.value.code == "precision_unreachable" and "coarser precision" in err.value.message
    with pytest.raises(QueryError, match="not both"):
        fed.coordinator.run(COUNT_SQL, fed.researcher, epsilon=1.0, precision=5.0)
    with pytest.raises(QueryError) as err:  # the restricted tier's noise is no ε's
        fed.coordinator.run("SELECT COUNT(*) FROM lycee_students", fed.researcher,
                            precision=5.0)
    assert err.value.code == "not_allowed" and "sensitive" in err.value.message
    with pytest.raises(QueryError, match="declared bounds"):
        fed.coordinator.price("SELECT SUM(absences) FROM pupils", fed.researcher, None, 5.0)
    assert fed.coordinator.projects.budget("demo").spent == spent


def test_sdk_price_and_sql_with_precision(url, fed) -> None:
    hub = connect(url, TOKEN)
    executed = fed.executed
    priced = hub.price("SELECT COUNT(*) AS n FROM pupils", precision=10)
    assert fed.executed == executed
    assert 0 < priced["epsilon"] < 1 and priced["level"] == 0.95
    assert priced["epsilon_remaining"] > 0
    df = hub.sql("SELECT COUNT(*) AS n FROM pupils", precision=10, progress=False)
    assert df.bulle.epsilon_spent == pytest.approx(priced["epsilon_charged"])
    assert df.bulle.meta["precision"]["epsilon"] == priced["epsilon"]
    assert abs(df["n"][0] - 649) <= 40  # ±10 at 95%: 40 is 4 intervals off
    with pytest.raises(BulleError, match="not both"):
        hub.sql("SELECT COUNT(*) AS n FROM pupils", epsilon=1.0, precision=10)
    with pytest.raises(BulleError) as err:
        hub.price("SELECT COUNT(*) AS n FROM pupils", precision=-1)
    assert err.value.code == "http_error" or "precision" in str(err.value)
