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
from tests._net import free_port

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


def test_dp_sum_does_not_count_missing_values(dp_fed) -> None:
    """A NULL is not a value: clamping must not turn it into the upper bound (LEAST/
    GREATEST skip NULLs, so LEAST(100, NULL) would have summed 100 per missing score)."""
    nulls = sum(e.cursor().sql("SELECT count(*) FROM student_assessment WHERE score IS NULL"
                               ).fetchall()[0][0] for e in dp_fed.engines.values())
    out = dp_fed.coordinator.run("SELECT SUM(score) AS s FROM student_assessment "
                                 "WHERE score IS NULL", dp_fed.researcher, epsilon=9.0)
    released, sd = out["rows"][0][0], out["noise_sd"][0][0]
    assert 100 * nulls > 10 * sd  # the bug would stand out by 10 sd at least
    assert abs(released) < 5 * sd, (released, sd, nulls)


@pytest.mark.parametrize(("sql", "fragment"), [
    ("SELECT id_assessment, COUNT(*) FROM student_assessment GROUP BY 1", "public domain"),
    ("SELECT MAX(score) FROM student_assessment", "MIN and MAX"),
    ("SELECT SUM(date_submitted) FROM student_assessment", "declared bounds"),
    ("SELECT SUM(score * 2) FROM student_assessment", "declared bounds"),
])
def test_dp_plans_refused_at_the_node(dp_fed, certs, board, sql: str, fragment: str) -> None:
    """Refused by the coordinator before its charge (free), and by the node itself when the
    plan is sent to it directly (before its own charge: free too)."""
    spent, executed = dp_fed.coordinator.projects.budget("demo").spent, dp_fed.executed
    with pytest.raises(QueryError) as err:
        dp_fed.coordinator.run(sql, dp_fed.researcher)
    assert err.value.code == "not_allowed" and fragment in err.value.message
    assert dp_fed.coordinator.projects.budget("demo").spent == spent
    assert dp_fed.executed == executed
    plan = plan_query(parse(sql, dp_fed.coordinator.schema())).plan
    plan.request_id, plan.project, plan.researcher = f"static-{hash(sql)}", "demo", "alice"
    plan.privacy.epsilon, plan.privacy.grant = 0.5, make_grant(board, 1000.0)
    ledger = dp_fed.engines["v1"].guard.ledger
    before = len(ledger.history("demo", "student_assessment"))
    stub, channel = _node_stub(dp_fed, "v1", certs)
    try:
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Execute(plan, timeout=10)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in rpc.value.details()
    finally:
        channel.close()
    assert len(ledger.history("demo", "student_assessment")) == before  # not even a refusal


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
        "no grant": "",
    }
    try:
        for what, token in cases.items():
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
        executed = fed.executed
        with pytest.raises(QueryError) as err:
            fed.coordinator.run("SELECT COUNT(*) FROM student_assessment", fed.researcher)
        # refused by the coordinator's ledger, before any node received the plan
        assert err.value.code == "budget_exhausted" and fed.executed == executed
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



@pytest.mark.slow
def test_a_node_killed_between_charge_and_reply_keeps_the_charge(tmp_path, certs, board) -> None:
    """Crash after the charge, before the reply: the charge stands, the audit verifies, and
    a replay of the request id charges nothing more."""
    import os
    import subprocess
    import sys
    import time

    from privacy import Ledger
    from tests._federation import node_toml

    config = tmp_path / "v1.toml"
    config.write_text(node_toml("v1", certs, vendor(("AAA",)),
                                f'board_public_key = "{board / "board_ed25519.pub.pem"}"\n'
                                f'state_dir = "{tmp_path / "state"}"'))
    port = free_port()
    token = make_grant(board, 100.0)

    def start(failpoint: bool) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "BULLE_FAILPOINT"}
        if failpoint:
            env["BULLE_FAILPOINT"] = "after-charge"
        proc = subprocess.Popen([sys.executable, "-m", "bulle_cli", "node", "serve", "--config",
                                 str(config), "--listen", f"127.0.0.1:{port}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        import socket

        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return proc
            assert proc.poll() is None, "node died during start-up"
            time.sleep(0.1)
        proc.kill()
        raise TimeoutError("node did not start")

    creds = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / "bulle-coordinator.key").read_bytes(),
        (certs / "bulle-coordinator.pem").read_bytes())

    def plan() -> pb.Plan:
        p = pb.Plan(request_id="crash-1", project="demo", researcher="alice")
        p.source.table = p.source.alias = "student_assessment"
        p.aggregates.add(name="p0", kind=pb.COUNT_ROWS)
        p.privacy.epsilon, p.privacy.grant = 0.5, token
        return p

    proc = start(failpoint=True)
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel, \
                pytest.raises(grpc.RpcError):
            pb_grpc.NodeStub(channel).Execute(plan(), timeout=30)
        assert proc.wait(30) == 86  # died at the failpoint, after the charge
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ledger = Ledger(str(tmp_path / "state" / "ledger.sqlite"))
    charges = [h for h in ledger.history("demo", "student_assessment") if h.accepted]
    assert [c.request_id for c in charges] == ["crash-1"]
    spent = ledger.spent("demo", "student_assessment")[0]
    assert AuditLog(tmp_path / "state" / "audit.sqlite").verify().ok

    proc = start(failpoint=False)
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            result = pb_grpc.NodeStub(channel).Execute(plan(), timeout=30)
        assert result.epsilon_spent == 0.5
        assert ledger.spent("demo", "student_assessment")[0] == spent  # not charged twice
        assert len([h for h in ledger.history("demo", "student_assessment")
                    if h.accepted]) == 1
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert AuditLog(tmp_path / "state" / "audit.sqlite").verify().ok


def test_differencing_queries_each_cost_budget(dp_fed) -> None:
    """Two queries whose difference would isolate one learner are two releases: both are
    charged, and each carries its own noise."""
    projects = dp_fed.coordinator.projects
    before = projects.budget("demo").spent
    everyone = dp_fed.coordinator.run("SELECT COUNT(*) FROM student_assessment",
                                      dp_fed.researcher, epsilon=0.5)
    after_one = projects.budget("demo").spent
    one_less = dp_fed.coordinator.run(
        "SELECT COUNT(*) FROM student_assessment WHERE id_student <> 11391",
        dp_fed.researcher, epsilon=0.5)
    after_two = projects.budget("demo").spent
    assert before < after_one < after_two
    # the difference is dominated by noise (sd ≈ 20·√2/0.5 per release), not by one learner
    diff = everyone["rows"][0][0] - one_less["rows"][0][0]
    sd = (everyone["noise_sd"][0][0] ** 2 + one_less["noise_sd"][0][0] ** 2) ** 0.5
    assert sd > 50 and everyone["noise_sd"][0][0] > 0
    assert abs(diff) < 6 * sd


def test_sdk_budget_and_epsilon(dp_fed) -> None:
    from enclave import connect
    from federation._api import build_app
    from tests._federation import TOKEN
    from tests.test_api import ServerThread

    with ServerThread(build_app(dp_fed.coordinator)) as url:
        hub = connect(url, TOKEN)
        before = hub.budget()
        assert before["project"] == "demo" and before["epsilon"] == 1000.0
        df = hub.sql("SELECT is_banked, COUNT(*) AS n FROM student_assessment GROUP BY 1",
                     epsilon=0.25)
        assert df["is_banked"].tolist() == [0, 1]
        assert df.bulle.noise_sd["n"].notna().all() and df.bulle.noise_sd["is_banked"].isna().all()
        assert df.bulle.epsilon_spent > 0.25 * 0.99
        after = hub.budget()
        assert after["epsilon_spent"] > before["epsilon_spent"]
        assert after["epsilon_remaining"] < before["epsilon_remaining"]
        report = hub._check(hub._http.get("/v1/budget", params={"report": True}))
        assert 0 < report["epsilon_spent_pld"] <= report["epsilon_spent"] * 1.01


def test_per_unit_rank_only_when_a_unit_can_exceed_its_bound(dp_fed) -> None:
    """The node skips the (costly) per-unit rank when load-time data shows no unit has more
    rows than max_rows_per_unit and no join can multiply rows; otherwise it keeps it."""
    from dataclasses import replace as with_

    from nodes._compile import compile_plan

    engine = dp_fed.engines["v1"]
    meta = engine.meta["student_assessment"]
    assert meta.max_unit_rows > 0
    plan = _dp_plan(dp_fed, "unused", "rank-check")
    for most, expect_rank in ((meta.max_rows_per_unit, False),
                              (meta.max_rows_per_unit + 1, True), (0, True)):
        catalog = {**engine.meta, "student_assessment": with_(meta, max_unit_rows=most)}
        sql = compile_plan(plan, catalog, 1000).sql.upper()
        assert ("ROW_NUMBER" in sql) is expect_rank, (most, sql)
    joined = plan_query(parse("SELECT COUNT(*) FROM student_assessment s JOIN assessments a "
                              "USING (id_assessment)", dp_fed.coordinator.schema())).plan
    joined.privacy.epsilon = 1.0
    catalog = {**engine.meta, "student_assessment": with_(meta, max_unit_rows=1)}
    assert "ROW_NUMBER" in compile_plan(joined, catalog, 1000).sql.upper()


# A node process: its engine and gRPC server, the port on stdout; on a line from stdin, it
# prints which heavy libraries it loaded, then stops.
_NODE_PROCESS = """
import sys
from nodes._config import load_node_config
from nodes._engine import NodeEngine
from nodes._service import build_server
import privacy

config = load_node_config(sys.argv[1])
engine = NodeEngine(config)
server, port = build_server(config, engine)
print(port, flush=True)
sys.stdin.readline()
privacy.ptable_for(privacy.CkmParams())  # the restricted tier's table, generated at start
heavy = ["dp_accounting", "scipy", "torch", "flwr", "opacus", "jupyterhub"]
print(",".join(m for m in heavy if m in sys.modules) or "-", "opendp" in sys.modules,
      flush=True)
server.stop(None).wait()
engine.close()
"""


def test_a_node_serving_dp_queries_loads_no_dp_accounting_or_scipy(tmp_path, certs,
                                                                    board) -> None:
    """A real DP release through a real node process, charged to its ledger: the node's
    events are closed forms (privacy/_events.py), so neither dp-accounting nor scipy loads
    (the slim node image has neither: issue 15)."""
    import subprocess
    import sys

    from federation._config import CoordinatorConfig, NodeEndpoint, Researcher, hash_token
    from federation._coordinator import Coordinator
    from tests._federation import TOKEN, node_toml

    grant = tmp_path / "demo.grant"
    grant.write_text(make_grant(board, 50.0))
    path = tmp_path / "v1.toml"
    path.write_text(node_toml("v1", certs, vendor(("AAA", "BBB")),
                              f'board_public_key = "{board / "board_ed25519.pub.pem"}"\n'
                              f'state_dir = "{tmp_path / "v1-state"}"'))
    node = subprocess.Popen([sys.executable, "-c", _NODE_PROCESS, str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    coordinator = None
    try:
        port = int(node.stdout.readline())
        researcher = Researcher("alice", hash_token(TOKEN), ("demo",))
        coordinator = Coordinator(CoordinatorConfig(
            listen="127.0.0.1:0", cert=certs / "bulle-coordinator.pem",
            key=certs / "bulle-coordinator.key", ca=certs / "ca.pem",
            nodes=(NodeEndpoint("v1", f"127.0.0.1:{port}"),), researchers=(researcher,),
            node_timeout_s=30, catalog_ttl_s=3600, state_dir=tmp_path / "coordinator",
            projects=(ProjectConfig("demo", grant, 0.5, True),),
            board_public_key=board / "board_ed25519.pub.pem"))
        result = coordinator.run("SELECT COUNT(*) AS n, AVG(score) AS s FROM "
                                 "student_assessment", researcher, epsilon=2.0)
        assert result["tier"] == "sensitive"
        assert result["epsilon_spent"] == pytest.approx(2.0, rel=0.05)
        assert result["noise_sd"][0][0] > 0 and 0 <= result["rows"][0][1] <= 100
        out, _ = node.communicate("\n", timeout=60)
    finally:
        if coordinator is not None:
            coordinator.close()
        if node.poll() is None:
            node.kill()
            node.wait(timeout=10)
    heavy, opendp = out.split()
    assert opendp == "True"  # the release was made in that process, by OpenDP
    assert heavy == "-", f"the node loaded {heavy}"
    # the node charged its own ledger, in dp-accounting's JSON, with the closed-form RDP
    from privacy import Ledger

    ledger = Ledger(str(tmp_path / "v1-state" / "ledger.sqlite"))
    try:
        charges = ledger.history("demo", "student_assessment")
    finally:
        ledger.close()
    assert [(c.accepted, c.event["type"]) for c in charges] == [(True, "ComposedDpEvent")]
    assert {e["type"] for e in charges[0].event["events"]} == {"LaplaceDpEvent"}
