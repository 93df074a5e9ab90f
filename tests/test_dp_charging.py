"""The sensitive tier charges before it runs, at the node and at the coordinator, and
post-processes what it releases into public ranges (real engines and gRPC servers)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest

from federation import _dp_rules as dp_rules
from federation._coordinator import QueryRecord
from federation._errors import QueryError
from federation._sql import parse
from federation.proto import bulle_pb2 as pb
from privacy import PROJECT_WIDE, Ledger
from tests._federation import Federation
from tests.test_sensitive_tier import (  # noqa: F401  (board: a fixture)
    _dp_plan,
    _fits_exactly,
    _node_stub,
    board,
    dp_federation,
    make_grant,
    vendor,
)

SA = "student_assessment"
COUNT = "SELECT COUNT(*) FROM student_assessment"


def _accepted(ledger: Ledger, scope: str) -> list:
    return [h for h in ledger.history("demo", scope) if h.accepted]


@contextmanager
def failing_runs(fed: Federation, node: str) -> Iterator[list[int]]:
    """The node's DuckDB fails every plan it evaluates (a real DuckDB error, through the
    engine's own error path); yields the list of evaluations made meanwhile."""
    engine = fed.engines[node]
    original = engine._run
    calls: list[int] = []

    def run(plan: pb.Plan, sql: str) -> pa.Table:
        calls.append(1)
        return original(plan, "SELECT CAST('no number' AS INTEGER) AS p0")

    engine._run = run  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del engine._run  # the class's method again


def _submit(fed: Federation, sql: str, epsilon: float = 0.5) -> QueryRecord:
    record = fed.coordinator.submit(sql, fed.researcher, epsilon=epsilon)
    assert record.done.wait(60)
    return record


@pytest.fixture
def two_nodes(tmp_path: Path, certs: Path, board: Path) -> Iterator[Federation]:  # noqa: F811
    fed = dp_federation(tmp_path, certs, board, 100.0, disjoint=False)
    yield fed
    fed.close()


def test_a_plan_failing_while_running_costs_at_both_ledgers(two_nodes: Federation) -> None:
    fed = two_nodes
    coordinator = fed.coordinator.projects
    with failing_runs(fed, "v1") as calls:
        record = _submit(fed, COUNT, epsilon=0.5)
    assert record.status == "failed" and calls == [1]
    assert record.exception is not None  # the code is the nodes' failure outcome, not
    assert record.exception.code not in ("budget_exhausted", "not_allowed")  # a refusal here
    # the coordinator reserved ε × 2 nodes (not disjoint) before the fan-out: it stands
    [charge] = _accepted(coordinator.ledger, PROJECT_WIDE)
    assert charge.request_id == record.id and charge.epsilon_claim == pytest.approx(1.0)
    assert coordinator.budget("demo").spent > 0
    # each node charged its own ledger when it accepted the plan, the failing one included
    for node in ("v1", "v2"):
        [c] = _accepted(fed.engines[node].guard.ledger, SA)
        assert c.request_id == record.id and c.epsilon_claim == pytest.approx(0.5)
    # the records say what happened: charged, then failed (with the ε it cost)
    v1 = [e for e in fed.engines["v1"].guard.audit.entries()
          if e.detail.get("request_id") == record.id]
    assert [e.action for e in v1] == ["charged", "failed"]
    assert v1[0].detail["epsilon"] == pytest.approx(0.5)
    assert fed.engines["v1"].guard.failure(record.id) is not None
    log = [e for e in coordinator.audit.entries() if e.detail.get("query") == record.id]
    assert log[0].action == "charged" and log[-1].action in ("refused", "error")
    assert log[-1].detail["epsilon"] == pytest.approx(1.0)
    assert log[-1].detail["datasets"] == [SA]


def test_a_replayed_request_id_gets_the_same_failure(two_nodes: Federation, certs: Path,
                                                     board: Path) -> None:  # noqa: F811
    fed = two_nodes
    ledger = fed.engines["v1"].guard.ledger
    stub, channel = _node_stub(fed, "v1", certs)
    plan = _dp_plan(fed, make_grant(board, 100.0), "fail-then-replay")
    try:
        with failing_runs(fed, "v1") as calls:
            with pytest.raises(grpc.RpcError) as first:
                stub.Execute(plan, timeout=10)
            spent = ledger.spent("demo", SA)[0]
            assert spent > 0 and calls == [1]
            with pytest.raises(grpc.RpcError) as again:
                stub.Execute(plan, timeout=10)
            assert calls == [1]  # not evaluated a second time
        # even now that it would succeed, the request id's outcome is the failure
        with pytest.raises(grpc.RpcError) as later:
            stub.Execute(plan, timeout=10)
    finally:
        channel.close()
    for err in (again, later):
        assert err.value.code() == first.value.code()
        assert err.value.details() == first.value.details()
    assert ledger.spent("demo", SA)[0] == spent
    assert [c.request_id for c in _accepted(ledger, SA)] == ["fail-then-replay"]
    actions = [e.action for e in fed.engines["v1"].guard.audit.entries()
               if e.detail.get("request_id") == "fail-then-replay"]
    assert actions == ["charged", "failed", "failed", "failed"]


def test_a_query_over_what_is_left_never_runs(tmp_path: Path, certs: Path,
                                              board: Path) -> None:  # noqa: F811
    fed = dp_federation(tmp_path, certs, board, _fits_exactly(1, 0.5))
    coordinator = fed.coordinator.projects
    try:
        with pytest.raises(QueryError) as err:
            fed.coordinator.run(COUNT, fed.researcher, epsilon=2.0)
        assert err.value.code == "budget_exhausted" and "is left" in err.value.message
        assert fed.executed == 0 and coordinator.budget("demo").spent == 0
        fed.coordinator.run(COUNT, fed.researcher, epsilon=0.5)  # what does fit, runs
        assert fed.executed == 2
        spent = coordinator.budget("demo").spent
        with pytest.raises(QueryError) as err:
            fed.coordinator.run(COUNT, fed.researcher, epsilon=0.5)
        assert err.value.code == "budget_exhausted"
        assert fed.executed == 2 and coordinator.budget("demo").spent == spent
        for node in ("v1", "v2"):
            assert len(_accepted(fed.engines[node].guard.ledger, SA)) == 1
    finally:
        fed.close()


def test_a_node_refuses_what_its_ledger_cannot_pay_before_running(
        tmp_path: Path, certs: Path, board: Path) -> None:  # noqa: F811
    """The node's ledger is authoritative for its side: a plan straight to the node that
    asks for more than is left there is refused with no cost and no evaluation."""
    cap = _fits_exactly(1, 0.5)
    fed = dp_federation(tmp_path, certs, board, cap, {"v1": vendor(("AAA",))})
    token = make_grant(board, cap)
    engine = fed.engines["v1"]
    evaluated: list[int] = []
    original = engine._run

    def run(plan: pb.Plan, sql: str) -> pa.Table:
        evaluated.append(1)
        return original(plan, sql)

    engine._run = run  # type: ignore[method-assign]
    stub, channel = _node_stub(fed, "v1", certs)
    try:
        stub.Execute(_dp_plan(fed, token, "fits"), timeout=10)
        spent = engine.guard.ledger.spent("demo", SA)[0]
        with pytest.raises(grpc.RpcError) as err:
            stub.Execute(_dp_plan(fed, token, "too-much", epsilon=0.5), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exhausted" in err.value.details()
        assert evaluated == [1] and engine.guard.ledger.spent("demo", SA)[0] == spent
    finally:
        channel.close()
        fed.close()


def test_twenty_concurrent_queries_never_overspend(tmp_path: Path, certs: Path,
                                                   board: Path) -> None:  # noqa: F811
    cap = _fits_exactly(5, 0.5)
    fed = dp_federation(tmp_path, certs, board, cap)  # disjoint: k = 1 at the coordinator
    try:
        def one(_: int) -> bool:
            try:
                fed.coordinator.run(COUNT, fed.researcher, epsilon=0.5)
                return True
            except QueryError as e:
                assert e.code == "budget_exhausted", e.message
                return False

        with futures.ThreadPoolExecutor(20) as pool:
            outcomes = list(pool.map(one, range(20)))
        assert sum(outcomes) == 5
        assert fed.executed == 10  # the 15 refused queries reached no node
        coordinator = fed.coordinator.projects
        assert len(_accepted(coordinator.ledger, PROJECT_WIDE)) == 5
        assert coordinator.budget("demo").spent <= cap
        for node in ("v1", "v2"):
            ledger = fed.engines[node].guard.ledger
            assert len(_accepted(ledger, SA)) == 5 and ledger.spent("demo", SA)[0] <= cap
    finally:
        fed.close()


def test_epsilon_spent_is_the_charge_and_the_composed_growth_is_separate(
        two_nodes: Federation) -> None:
    fed = two_nodes
    first = fed.coordinator.run(COUNT, fed.researcher, epsilon=0.5)
    second = fed.coordinator.run(COUNT, fed.researcher, epsilon=0.5)
    for r in (first, second):
        assert r["epsilon_spent"] == pytest.approx(1.0)  # ε × 2 nodes (not disjoint)
        b = r["budget"]
        assert b["composed_epsilon_after"] == pytest.approx(b["epsilon_spent"])
        assert b["composed_epsilon_after"] > b["composed_epsilon_before"]
    assert second["budget"]["composed_epsilon_before"] == pytest.approx(
        first["budget"]["composed_epsilon_after"])
    # RDP composition at δ: the total is not the sum of the queries' ε
    growth = [r["budget"]["composed_epsilon_after"] - r["budget"]["composed_epsilon_before"]
              for r in (first, second)]
    assert growth[0] != pytest.approx(growth[1], rel=1e-3)


# -- DP post-processing ------------------------------------------------------------------

def test_post_processing_clips_counts_and_means_into_their_ranges() -> None:
    """Fixed-seed noisy draws of a small count (true 2, Laplace b = 20) and of a mean of a
    column bounded by [0, 100]: clipped to whole counts ≥ 0 and means within the bounds,
    intervals likewise; the clipped count has the mean of max(0, X) (not |X|, not X)."""
    rng = np.random.default_rng(20240611)
    n, b, mu = 20_000, 20.0, 2.0
    counts = np.round(mu + rng.laplace(0.0, b, n))
    means = 50.0 + rng.laplace(0.0, 80.0, n)
    table = pa.table({"g": np.arange(n), "n": counts, "mean": means, "v": -means})
    sd = [[None, 1.0, 1.0, 1.0] for _ in range(n)]
    lo = [[None, c - 40, m - 150, -m - 150] for c, m in zip(counts, means, strict=True)]
    hi = [[None, c + 40.5, m + 150, -m + 150] for c, m in zip(counts, means, strict=True)]
    query = parse("SELECT is_banked AS g, COUNT(*) AS n, AVG(score) AS mean, "
                  "VAR_POP(score) AS v FROM student_assessment GROUP BY 1",
                  {SA: {"is_banked": "INTEGER", "score": "DOUBLE"}})
    ranges = dp_rules.ranges(query, {(SA, "score"): (0.0, 100.0)})
    assert ranges["n"] == dp_rules.Range(0.0, None, whole=True)
    assert ranges["mean"] == dp_rules.Range(0.0, 100.0)
    assert ranges["v"] == dp_rules.Range(0.0, 2500.0)
    out = dp_rules.post_process(table, (sd, lo, hi), ranges)
    released = out.column("n").to_numpy()
    assert out.schema.field("n").type == pa.int64() and released.min() == 0
    # E[max(0, μ + L)] = μ + (b/2)·e^(−μ/b) = 11.05; its sd here ≈ 23, se ≈ 0.17
    assert released.mean() == pytest.approx(mu + b / 2 * np.exp(-mu / b), abs=0.7)
    # round(μ + L) ≤ 0 ⟺ L ≤ −1.5
    assert (released == 0).mean() == pytest.approx(0.5 * np.exp(-1.5 / b), abs=0.02)
    m = out.column("mean").to_numpy()
    assert m.min() == 0.0 and m.max() == 100.0
    assert (m == 100.0).mean() == pytest.approx(0.5 * np.exp(-50 / 80), abs=0.02)
    assert out.column("v").to_numpy().min() == 0.0  # a variance is never negative
    for row in range(n):
        assert 0 <= lo[row][1] <= hi[row][1] and float(lo[row][1]).is_integer()
        assert float(hi[row][1]).is_integer()
        assert 0.0 <= lo[row][2] <= hi[row][2] <= 100.0
        assert 0.0 <= lo[row][3] <= hi[row][3] <= 2500.0
        assert lo[row][1] <= released[row] <= hi[row][1]
    # interval ends go outwards to whole numbers (never inwards)
    assert hi[0][1] == max(np.ceil(counts[0] + 40.5), 0)


@pytest.mark.parametrize("having", ["", " HAVING COUNT(*) > -1000000"])  # arrow / SQL merge
def test_released_values_stay_in_their_public_ranges(two_nodes: Federation,
                                                     having: str) -> None:
    """No pupil matches, so every true value is 0 or undefined: without post-processing
    about half the counts would be negative and the means anywhere."""
    fed = two_nodes
    sql = ("SELECT is_banked, COUNT(*) AS n, AVG(score) AS mean, VAR_POP(score) AS v, "
           "STDDEV_SAMP(score) AS s FROM student_assessment WHERE score > 1000 "
           f"GROUP BY 1{having}")
    zeros, total = 0, 0
    for _ in range(40):
        r = fed.coordinator.run(sql, fed.researcher, epsilon=1.0)
        assert [c["type"] for c in r["columns"]][1] == "integer"
        for row, lo, hi in zip(r["rows"], r["ci_low"], r["ci_high"], strict=True):
            _, n, mean, v, s = row
            assert isinstance(n, int) and n >= 0
            zeros += n == 0
            total += 1
            assert mean is None or 0.0 <= mean <= 100.0
            assert v is None or 0.0 <= v <= 2500.0
            assert s is None or 0.0 <= s <= np.sqrt(5000.0)
            assert 0 <= lo[1] <= n <= hi[1] and float(lo[1]).is_integer()
            for col in (2, 3):
                if lo[col] is not None:
                    assert 0.0 <= lo[col] <= hi[col] <= (100.0 if col == 2 else 2500.0)
    # a symmetric noise around 0, clipped: about half the cells come out as 0
    assert 0.3 < zeros / total < 0.7, (zeros, total)


def test_node_partial_counts_are_whole(two_nodes: Federation, certs: Path,
                                       board: Path) -> None:  # noqa: F811
    fed = two_nodes
    stub, channel = _node_stub(fed, "v1", certs)
    try:
        token = make_grant(board, 100.0)
        values = []
        for i in range(20):
            result = stub.Execute(_dp_plan(fed, token, f"whole-{i}", epsilon=0.1), timeout=10)
            values += pa.ipc.open_stream(result.arrow_ipc).read_all().column(0).to_pylist()
    finally:
        channel.close()
    assert all(float(v).is_integer() for v in values)
    assert len(set(values)) > 10  # noisy (b = 200), not a constant
