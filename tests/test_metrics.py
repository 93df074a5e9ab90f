"""Operators' metrics: a real node (gRPC, mutual TLS) with its Prometheus listener and a real
coordinator API (uvicorn), each on a free loopback port; a query is sent and both
``/metrics`` are scraped over HTTP and parsed with ``prometheus_client.parser``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from federation._api import build_app
from federation._config import CoordinatorConfig, NodeEndpoint, Researcher, hash_token
from federation._coordinator import Coordinator
from federation._hubauth import SCOPE_METRICS, Caller
from nodes._config import load_node_config
from nodes._engine import NodeEngine
from nodes._metrics import NodeMetrics, _AuditFigures
from nodes._service import build_server
from privacy import BOARD_REQUEST_SCHEME, generate_board_keys, sign_board_request
from tests._federation import TOKEN, node_toml
from tests.conftest import depp
from tests.test_api import ServerThread


class Setup:
    def __init__(self, tmp: Path, certs: Path) -> None:
        generate_board_keys(tmp / "board")
        self.board_key = (tmp / "board" / "board_ed25519.pem").read_bytes()
        path = tmp / "depp.toml"
        path.write_text(node_toml("depp", certs, depp(), 'metrics_listen = "127.0.0.1:0"'))
        config = load_node_config(path)
        self.engine = NodeEngine(config)
        self.metrics = NodeMetrics(self.engine)
        self.server, port = build_server(config, self.engine, timer=self.metrics.interceptor)
        self.metrics_port = self.metrics.serve(config.metrics_listen)
        self.coordinator = Coordinator(CoordinatorConfig(
            listen="127.0.0.1:0", cert=certs / "bulle-coordinator.pem",
            key=certs / "bulle-coordinator.key", ca=certs / "ca.pem",
            nodes=(NodeEndpoint("depp", f"127.0.0.1:{port}"),),
            researchers=(Researcher("alice", hash_token(TOKEN), ("demo",)),),
            state_dir=tmp / "coordinator",
            board_public_key=tmp / "board" / "board_ed25519.pub.pem"))

    def close(self) -> None:
        self.coordinator.close()
        self.server.stop(grace=None).wait()
        self.metrics.close()
        self.engine.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("metrics"), certs)
    yield s
    s.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def test_node_and_coordinator_metrics_move_with_a_query(setup: Setup) -> None:
    node_url = f"http://127.0.0.1:{setup.metrics_port}/metrics"
    before = _samples(httpx.get(node_url).text)
    with ServerThread(build_app(setup.coordinator)) as url:
        def scrape() -> dict:
            token = sign_board_request(setup.board_key, "GET", "/metrics", b"")
            r = httpx.get(f"{url}/metrics",
                          headers={"Authorization": f"{BOARD_REQUEST_SCHEME} {token}"})
            assert r.status_code == 200, r.text
            return _samples(r.text)

        first = scrape()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for sql in ("SELECT COUNT(*) AS n FROM ips_colleges",
                    "SELECT COUNT(*) FROM no_such_table"):  # refused by the coordinator
            httpx.post(f"{url}/v1/queries", headers=auth, json={"sql": sql}, timeout=60)
        after = scrape()
        # a researcher's token does not open /metrics; no token at all is a 401
        assert httpx.get(f"{url}/metrics", headers=auth).status_code == 403
        assert httpx.get(f"{url}/metrics").status_code == 401
    node = _samples(httpx.get(node_url).text)

    released = _value(node, "bulle_node_plans_total", node="depp", dataset="ips_colleges",
                      tier="open", outcome="released")
    assert released - _value(before, "bulle_node_plans_total", outcome="released") == 1
    assert _value(node, "bulle_node_rpc_seconds_count", method="Execute", code="OK") >= 1
    assert _value(node, "bulle_node_rpc_seconds_count", method="GetCatalog", code="OK") >= 1
    assert _value(node, "bulle_node_plan_seconds_count", node="depp") >= 1
    assert _value(node, "bulle_node_audit_entries", node="depp") >= 1
    assert _value(node, "bulle_node_state_bytes", store="audit") > 0

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(first, name, **labels)

    assert moved("bulle_coordinator_queries_total", tier="open", outcome="released",
                 code="ok") == 1
    assert moved("bulle_coordinator_queries_total", outcome="refused") == 1
    assert moved("bulle_coordinator_query_seconds_count", outcome="released") == 1
    assert _value(after, "bulle_coordinator_node_up", node="depp") == 1
    assert _value(after, "bulle_coordinator_audit_entries") >= 2
    # nothing about one person, nor a researcher, project or query: only these labels
    labels = {k for samples in (node, after) for (_, ls) in samples for k, _ in ls}
    assert labels <= {"node", "dataset", "tier", "outcome", "method", "code", "le", "store",
                      "table", "event", "kind", "status"}


def test_audit_figures_count_epsilon_and_training_rounds_from_fixed_vocabularies() -> None:
    f = _AuditFigures("n", {"grades": "sensitive"})
    entries: list[tuple[str, dict[str, Any]]] = [
        ("charged", {"dataset": "grades", "epsilon": 0.5, "replay": False}),
        ("charged", {"dataset": "grades", "epsilon": 0.5, "replay": True}),  # not again
        ("train_charged", {"table": "grades", "epsilon": 0.25}),
        ("train_released", {"table": "grades"}),
        ("train_refused", {"table": "<anything the caller sent>"}),
        ("refused", {"reason": "x", "tables": ["not_declared"]}),
    ]
    for action, detail in entries:
        f.fold(action, detail)
    assert f.epsilon == {("grades", "sensitive"): 0.75}
    assert f.rounds == {("grades", "released"): 1, ("other", "refused"): 1}
    assert f.plans == {("other", "unknown", "refused"): 1}


class _MonitoringHub:
    """The hub's token check for Prometheus' service token: the metrics scope only."""

    TOKEN = "prometheus-service-token"

    def identify(self, token: str) -> Caller | None:
        return Caller("service-prometheus", frozenset({SCOPE_METRICS}), "hub") \
            if token == self.TOKEN else None

    def close(self) -> None:
        pass


def test_the_monitoring_token_reads_metrics_and_nothing_else(setup: Setup) -> None:
    setup.coordinator.hub = _MonitoringHub()  # type: ignore[assignment]
    try:
        with ServerThread(build_app(setup.coordinator)) as url:
            auth = {"Authorization": f"Bearer {_MonitoringHub.TOKEN}"}
            r = httpx.get(f"{url}/metrics", headers=auth)
            assert r.status_code == 200 and "bulle_coordinator_queries_total" in r.text
            for method, path in (("GET", "/v1/board/export"), ("GET", "/v1/projects"),
                                 ("GET", "/v1/catalog"), ("POST", "/v1/queries")):
                r = httpx.request(method, f"{url}{path}", headers=auth,
                                  json={"sql": "SELECT 1"} if method == "POST" else None)
                assert r.status_code == 403, (path, r.status_code)
    finally:
        setup.coordinator.hub = None
