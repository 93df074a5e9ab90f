"""The sensitive tier end to end: DP releases, grants, both ledgers, replay, audit."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest

from federation._config import ProjectConfig
from federation._errors import QueryError
from federation._planner import plan_query
from federation._sql import parse
from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from privacy import AuditLog, Grant, RdpTotals, generate_board_keys, sign_grant
from tests._federation import DATA, Federation, start_federation

ASSESSMENTS = DATA / "oulad" / "assessments.csv"
SUBMISSIONS = DATA / "oulad" / "studentAssessment.csv"


def vendor(modules: tuple[str, ...]) -> list[dict]:
    mods = ", ".join(f"'{m}'" for m in modules)
    return [
        {"table": "assessments", "source": str(ASSESSMENTS), "tier": "open",
         "filter": f"code_module IN ({mods})",
         "public_domains": {"assessment_type": ["CMA", "Exam", "TMA"]}},
        {"table": "student_assessment", "source": str(SUBMISSIONS), "tier": "sensitive",
         "filter": "id_assessment IN (SELECT id_assessment FROM assessments)",
         "privacy_unit": "id_student", "max_rows_per_unit": 20,
         "bounds": {"score": [0, 100]}, "public_domains": {"is_banked": [0, 1]}},
    ]


def make_grant(board: Path, epsilon: float, project: str = "demo",
               researchers: tuple[str, ...] = ("alice",), days: float = 30) -> str:
    now = datetime.now(UTC)
    grant = Grant(project, researchers, ("student_assessment",), epsilon, 1e-6,
                  now + timedelta(days=days), "testing the sensitive tier", now)
    return sign_grant(grant, (board / "board_ed25519.pem").read_bytes())


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("board")
    generate_board_keys(path)
    return path


def dp_federation(tmp: Path, certs: Path, board: Path, epsilon: float,
                  nodes: dict[str, list[dict]] | None = None, disjoint: bool = True
                  ) -> Federation:
    grant_file = tmp / "demo.grant"
    grant_file.write_text(make_grant(board, epsilon))
    nodes = nodes or {"v1": vendor(("AAA", "BBB", "CCC")), "v2": vendor(("DDD", "EEE"))}
    return start_federation(tmp, certs, nodes, board_public_key=board / "board_ed25519.pub.pem",
                            projects=(ProjectConfig("demo", grant_file, 0.5, disjoint),))


@pytest.fixture(scope="module")
def dp_fed(tmp_path_factory, certs, board) -> Iterator[Federation]:
    fed = dp_federation(tmp_path_factory.mktemp("dp"), certs, board, epsilon=1000.0)
    yield fed
    fed.close()


def test_dp_query_releases_noisy_values_with_intervals(dp_fed, union_db) -> None:
    truth = dict(union_db.execute(
        "SELECT a.assessment_type, count(*) FROM student_assessment sa JOIN assessments a "
        "USING (id_assessment) WHERE a.code_module IN ('AAA','BBB','CCC','DDD','EEE') "
        "GROUP BY 1").fetchall())
    result = dp_fed.coordinator.run(
        "SELECT a.assessment_type, COUNT(*) AS n, AVG(score) AS mean FROM student_assessment sa "
        "JOIN assessments a USING (id_assessment) GROUP BY 1 ORDER BY 1", dp_fed.researcher,
        epsilon=2.0)
    assert [r[0] for r in result["rows"]] == ["CMA", "Exam", "TMA"]
    assert result["tier"] == "sensitive"
    for row, sd, lo, hi in zip(result["rows"], result["noise_sd"], result["ci_low"],
                               result["ci_high"], strict=True):
        assert sd[0] is None and lo[0] is None  # the key carries no noise
        assert sd[1] > 0 and lo[1] < row[1] < hi[1]
        # bounded contributions can only lower the count; noise is small at ε=2
        assert row[1] <= truth[row[0]] + 5 * sd[1]
        assert 0 <= row[2] <= 100 and lo[2] < row[2] < hi[2]
    # ε=2 per node (disjoint nodes: charged once at the coordinator)
    assert result["epsilon_spent"] == pytest.approx(2.0, rel=0.05)
    assert "split equally over 3 partial" in result["budget_split"]
    assert result["budget"]["epsilon_remaining"] < 1000


@pytest.mark.parametrize(("sql", "fragment"), [
    ("SELECT id_assessment, COUNT(*) FROM student_assessment GROUP BY 1", "public domain"),
    ("SELECT MAX(score) FROM student_assessment", "MIN and MAX"),
    ("SELECT SUM(date_submitted) FROM student_assessment", "declared bounds"),
    ("SELECT SUM(score * 2) FROM student_assessment", "declared bounds"),
])
def test_dp_plans_refused_at_the_node(dp_fed, sql: str, fragment: str) -> None:
    with pytest.raises(QueryError) as err:
        dp_fed.coordinator.run(sql, dp_fed.researcher)
    assert err.value.code == "node_refused" and fragment in err.value.message


def test_no_rows_and_no_grant_no_data(dp_fed, tmp_path, certs, board) -> None:
    with pytest.raises(QueryError, match="only allowed on open tables"):
        dp_fed.coordinator.run("SELECT score FROM student_assessment", dp_fed.researcher)
    other = dp_fed.other
    with pytest.raises(QueryError) as err:
        dp_fed.coordinator.run("SELECT COUNT(*) FROM student_assessment",
                               replace(other, projects=("bob-project",)))
    assert err.value.code == "no_grant"


def _node_stub(fed: Federation, node: str, certs: Path):
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / "bulle-coordinator.key").read_bytes(),
        (certs / "bulle-coordinator.pem").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{fed.ports[node]}", creds)
    return pb_grpc.NodeStub(channel), channel


def _dp_plan(fed: Federation, token: str, request_id: str, epsilon: float = 0.5,
             researcher: str = "alice") -> pb.Plan:
    plan = plan_query(parse("SELECT COUNT(*) FROM student_assessment",
                            fed.coordinator.schema())).plan
    plan.request_id, plan.project, plan.researcher = request_id, "demo", researcher
    plan.privacy.epsilon, plan.privacy.grant = epsilon, token
    return plan


def test_node_verifies_grants_itself(dp_fed, certs, board, tmp_path) -> None:
    stub, channel = _node_stub(dp_fed, "v1", certs)
    good = make_grant(board, 1000.0)
    foreign = tmp_path / "foreign"
    generate_board_keys(foreign)
    payload, signature = good.split(".")
    cases = {
        "tampered": payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "."
        + signature,
        "foreign key": make_grant(foreign, 1000.0),
        "expired": make_grant(board, 1000.0, days=-1) if False else None,
        "other researcher": None,
        "no grant": "",
    }
    try:
        for what, token in cases.items():
            if token is None:
                continue
            with pytest.raises(grpc.RpcError) as err:
                stub.Execute(_dp_plan(dp_fed, token, f"grant-{what}"), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert "grant" in err.value.details(), what
        with pytest.raises(grpc.RpcError) as err:
            stub.Execute(_dp_plan(dp_fed, good, "grant-bob", researcher="bob"), timeout=10)
        assert "does not name this researcher" in err.value.details()
        plan = _dp_plan(dp_fed, good, "grant-no-eps")
        plan.privacy.epsilon = 0
        with pytest.raises(grpc.RpcError) as err:
            stub.Execute(plan, timeout=10)
        assert "no ε" in err.value.details()
    finally:
        channel.close()


def test_expired_grant_refused(tmp_path, certs, board) -> None:
    now = datetime.now(UTC)
    grant = Grant("demo", ("alice",), ("student_assessment",), 5.0, 1e-6,
                  now - timedelta(seconds=1), "expired", now - timedelta(days=1))
    token = sign_grant(grant, (board / "board_ed25519.pem").read_bytes())
    fed = dp_federation(tmp_path, certs, board, 5.0, {"v1": vendor(("AAA",))})
    try:
        stub, channel = _node_stub(fed, "v1", certs)
        with pytest.raises(grpc.RpcError) as err:
            stub.Execute(_dp_plan(fed, token, "expired"), timeout=10)
        assert "grant refused (expired)" in err.value.details()
        channel.close()
    finally:
        fed.close()


def test_replaying_a_request_id_returns_the_same_release(dp_fed, certs, board) -> None:
    stub, channel = _node_stub(dp_fed, "v1", certs)
    token = make_grant(board, 1000.0)
    ledger = dp_fed.engines["v1"].guard.ledger
    try:
        first = stub.Execute(_dp_plan(dp_fed, token, "replay-1"), timeout=10)
        spent = ledger.spent("demo", "student_assessment")[0]
        again = stub.Execute(_dp_plan(dp_fed, token, "replay-1"), timeout=10)
        assert again.arrow_ipc == first.arrow_ipc and again.replayed and not first.replayed
        assert ledger.spent("demo", "student_assessment")[0] == spent
        other = stub.Execute(_dp_plan(dp_fed, token, "replay-2"), timeout=10)
        assert other.arrow_ipc != first.arrow_ipc  # a new request is a new noise draw
        assert ledger.spent("demo", "student_assessment")[0] > spent
    finally:
        channel.close()


def _fits_exactly(n: int, epsilon: float, parts: int = 1) -> float:
    from privacy import laplace_event

    totals = RdpTotals()
    event = None
    for _ in range(n):
        import dp_accounting as dpa

        event = dpa.ComposedDpEvent([laplace_event(epsilon / parts)] * parts)
        totals.add(event)
    cap = totals.epsilon(1e-6)
    assert not totals.would_fit(event, cap * 1.0001, 1e-6)  # an 11th would not fit
    return cap * 1.0001


def test_budget_exhaustion_says_what_was_needed(tmp_path, certs, board) -> None:
    cap = _fits_exactly(3, 0.5)
    fed = dp_federation(tmp_path, certs, board, cap, {"v1": vendor(("AAA", "BBB"))})
    try:
        for _ in range(3):
            fed.coordinator.run("SELECT COUNT(*) FROM student_assessment", fed.researcher)
        with pytest.raises(QueryError) as err:
            fed.coordinator.run("SELECT COUNT(*) FROM student_assessment", fed.researcher)
        assert err.value.code == "node_refused"
        assert "exhausted: this query needs ε=" in err.value.message and "is left" in \
            err.value.message
        budget = fed.coordinator.projects.budget("demo")
        assert budget.spent <= budget.epsilon
    finally:
        fed.close()


def test_hundred_concurrent_queries_against_a_budget_for_ten(tmp_path, certs, board) -> None:
    cap = _fits_exactly(10, 0.5)
    fed = dp_federation(tmp_path, certs, board, cap, {"v1": vendor(("AAA",))})
    try:
        def one(_: int) -> bool:
            try:
                fed.coordinator.run("SELECT COUNT(*) FROM student_assessment", fed.researcher)
                return True
            except QueryError as e:
                assert e.code in ("node_refused", "budget_exhausted"), e.message
                return False

        with futures.ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(one, range(100)))
        assert sum(outcomes) == 10
        node_ledger = fed.engines["v1"].guard.ledger
        accepted = [h for h in node_ledger.history("demo", "student_assessment") if h.accepted]
        assert len(accepted) == 10
        assert fed.coordinator.projects.budget("demo").spent <= cap
    finally:
        fed.close()


def test_audit_chains_record_every_decision_and_verify(dp_fed) -> None:
    dp_fed.coordinator.run("SELECT COUNT(*) FROM student_assessment", dp_fed.researcher)
    with pytest.raises(QueryError):
        dp_fed.coordinator.run("SELECT MAX(score) FROM student_assessment", dp_fed.researcher)
    node_log = dp_fed.engines["v1"].guard.audit
    coord_log = dp_fed.coordinator.projects.audit
    for log in (node_log, coord_log):
        report = log.verify()
        assert report.ok and report.entries >= 2, report
    path = Path(coord_log.path)
    import sqlite3
    import subprocess
    import sys

    def verify_cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bulle_cli", "audit", "verify", str(path)],
                              capture_output=True, text=True, timeout=60)

    ok = verify_cli()
    assert ok.returncode == 0 and "chain intact" in ok.stdout
    db = sqlite3.connect(path)
    db.execute("UPDATE audit_entries SET action = 'refused' WHERE seq = 1")
    db.commit()
    db.close()
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 1
    broken = verify_cli()
    assert broken.returncode == 1 and "broken at entry 1" in broken.stdout


def test_dp_count_intervals_cover_at_the_declared_rate(tmp_path, certs, board, union_db) -> None:
    """Coverage of the released 95% intervals over 1,000 federated DP counts.

    Truth is the bounded count (≤ 20 rows per learner), computed here in DuckDB.
    Binomial sd at 1,000 trials is 0.7 points: 93–97% is ±2.9 sd.
    """
    fed = dp_federation(tmp_path, certs, board, 1e6, {"v1": vendor(("AAA",))})
    truth = union_db.execute(
        "SELECT sum(least(n, 20)) FROM (SELECT id_student, count(*) AS n FROM "
        "student_assessment WHERE id_assessment IN (SELECT id_assessment FROM assessments "
        "WHERE code_module = 'AAA') GROUP BY 1)").fetchone()[0]
    try:
        covered, values, sds = 0, [], []
        for _ in range(1000):
            r = fed.coordinator.run("SELECT COUNT(*) FROM student_assessment", fed.researcher,
                                    epsilon=1.0)
            v, lo, hi = r["rows"][0][0], r["ci_low"][0][0], r["ci_high"][0][0]
            covered += lo <= truth <= hi
            values.append(v)
            sds.append(r["noise_sd"][0][0])
        assert 930 <= covered <= 970, covered
        # Laplace b = 20 / 1.0 → sd = b·√2 ≈ 28.3; empirical within 10% (sd of the sd ≈ 3%)
        assert np.std(values) == pytest.approx(20 * np.sqrt(2), rel=0.10)
        assert np.mean(sds) == pytest.approx(20 * np.sqrt(2), rel=0.05)
        assert abs(np.mean(values) - truth) < 4 * 28.3 / np.sqrt(1000)
    finally:
        fed.close()
