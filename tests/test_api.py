"""The coordinator's HTTP API and the researcher SDK, over a real uvicorn server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import httpx
import pandas as pd
import pytest
import uvicorn

from enclave import BulleError, connect
from federation._api import build_app
from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from tests._federation import OTHER_TOKEN, TOKEN, start_federation
from tests._net import free_port


class ServerThread:
    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def url(exact_fed) -> Iterator[str]:
    with ServerThread(build_app(exact_fed.coordinator)) as base:
        yield base


def test_sdk_returns_dataframes_with_metadata(url) -> None:
    hub = connect(url, TOKEN)
    df = hub.sql("SELECT school, COUNT(*) AS n, AVG(g3) AS mean FROM lycee_students "
                 "GROUP BY school ORDER BY school")
    assert list(df.columns) == ["school", "n", "mean"]
    assert df["school"].tolist() == ["GP", "MS"]
    assert str(df["n"].dtype) == "Int64" and df["n"].sum() == 649
    assert df.bulle.suppressed.shape == df.shape and not df.bulle.suppressed.values.any()
    assert df.bulle.nodes == ["gp", "ms"]
    catalog = hub.catalog()
    assert {"lycee_students", "student_info", "ips_colleges"} <= set(catalog["table"])
    row = catalog.set_index("table").loc["lycee_students"]
    assert row["tier"] == "restricted" and row["nodes"] == "gp, ms"
    cols = hub.describe("lycee_students")
    assert "g3" in set(cols["name"])
    assert cols.set_index("name").loc["sex", "public_domain"] == ["F", "M"]


def test_connect_reads_the_environment(url, monkeypatch) -> None:
    monkeypatch.setenv("BULLE_URL", url)
    monkeypatch.setenv("BULLE_TOKEN", TOKEN)
    assert connect().sql("SELECT COUNT(*) AS n FROM ips_colleges")["n"][0] == 6973
    monkeypatch.delenv("BULLE_URL")
    with pytest.raises(BulleError, match="BULLE_URL"):
        connect()


def test_authentication_and_projects(url) -> None:
    body = {"sql": "SELECT COUNT(*) FROM lycee_students"}
    assert httpx.post(f"{url}/v1/queries", json=body).status_code == 401
    assert httpx.post(f"{url}/v1/queries", json=body,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/catalog").status_code == 401
    r = httpx.post(f"{url}/v1/queries", json={**body, "project": "not-mine"},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_a_researcher_in_no_project_is_told_so(exact_fed) -> None:
    from federation._config import Researcher
    from federation._errors import QueryError

    with pytest.raises(QueryError) as err:
        exact_fed.coordinator.project_of(Researcher("carol", "0" * 64, ()), None)
    assert err.value.code == "forbidden" and "not in any project" in str(err.value)
    assert "''" not in str(err.value)


def test_query_status_and_isolation_between_researchers(url) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{url}/v1/queries", headers=auth, json={
        "sql": "SELECT sex, COUNT(*) FROM lycee_students GROUP BY sex", "wait_s": 0})
    assert r.status_code in (200, 202)
    qid = r.json()["id"]
    done = httpx.get(f"{url}/v1/queries/{qid}", headers=auth, params={"wait_s": 10}).json()
    assert done["status"] == "done" and len(done["result"]["rows"]) == 2
    other = httpx.get(f"{url}/v1/queries/{qid}",
                      headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert other.status_code == 404


def test_errors_are_json_with_codes(url) -> None:
    hub = connect(url, TOKEN)
    with pytest.raises(BulleError) as err:
        hub.sql("SELECT * FROM lycee_students")
    assert err.value.code == "not_allowed"
    with pytest.raises(BulleError) as err:
        hub.sql("SELEC COUNT(*) FROM lycee_students")
    assert err.value.code == "syntax_error" and err.value.detail.get("line") == 1


def test_casts_are_total_and_carry_no_data_values(url, exact_fed, caplog, union_db) -> None:
    jobs = {r[0] for r in union_db.execute("SELECT DISTINCT mjob FROM lycee_students").fetchall()}
    hub = connect(url, TOKEN)
    caplog.set_level(logging.DEBUG)
    # CAST compiles to TRY_CAST: a value that does not convert is NULL, never an error
    # (which would say that such a value exists, and quote it)
    df = hub.sql("SELECT COUNT(*) AS n FROM lycee_students WHERE CAST(mjob AS BIGINT) IS NULL")
    assert df["n"].tolist() == [649]  # every pupil: no job is a number
    coordinator_logs = " ".join(r.getMessage() for r in caplog.records
                                if r.name.startswith("bulle.coordinator"))
    for value in jobs:
        assert value not in coordinator_logs


def test_a_node_down_fails_the_query_and_names_it(tmp_path, certs) -> None:
    from tests.conftest import uci

    fed = start_federation(tmp_path, certs, {"gp": uci("GP"), "ms": uci("MS")},
                           node_timeout_s=5)
    try:
        assert fed.run("SELECT COUNT(*) FROM lycee_students")["rows"] == [[649]]
        fed.stop_node("ms")
        with ServerThread(build_app(fed.coordinator)) as base, \
                pytest.raises(BulleError) as err:
            connect(base, TOKEN).sql("SELECT COUNT(*) FROM lycee_students")
        assert err.value.code == "node_failed"
        assert "ms: unreachable" in str(err.value) and "gp" not in err.value.detail["nodes"]
    finally:
        fed.close()


class _SlowNode(pb_grpc.NodeServicer):
    """A real gRPC node that answers its catalogue but never finishes executing: it holds
    each Execute until the caller gives up on it (or the test releases it)."""

    def __init__(self, catalog: pb.Catalog) -> None:
        self.catalog = catalog
        self.deadlines: list[float | None] = []  # the time each Execute was given
        self.abandoned = threading.Event()  # an Execute the caller gave up on
        self.release = threading.Event()

    def GetCatalog(self, request, context):
        return self.catalog

    def Execute(self, request, context):
        self.deadlines.append(context.time_remaining())
        while context.is_active() and not self.release.wait(0.02):
            pass
        if not context.is_active():
            self.abandoned.set()
        return pb.PartialResult()


def test_a_slow_node_times_out_as_the_one_evaluation_failure(tmp_path, certs) -> None:
    """A deadline may depend on the data (a filter that makes a join explode): it is the
    same outcome as any failure of an accepted plan, naming neither node nor cause."""
    from federation._config import NodeEndpoint
    from tests.conftest import uci

    fed = start_federation(tmp_path, certs, {"gp": uci("GP")}, node_timeout_s=1)
    catalog = fed.engines["gp"].catalog()
    catalog.node_id = "slow"
    server = grpc.server(futures.ThreadPoolExecutor(2))
    slow = _SlowNode(catalog)
    pb_grpc.add_NodeServicer_to_server(slow, server)
    creds = grpc.ssl_server_credentials([((certs / "slow.key").read_bytes(),
                                          (certs / "slow.pem").read_bytes())],
                                        (certs / "ca.pem").read_bytes(), True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        from dataclasses import replace

        from federation._coordinator import Coordinator

        config = replace(fed.coordinator.config, nodes=(
            *fed.coordinator.config.nodes, NodeEndpoint("slow", f"127.0.0.1:{port}")))
        coordinator = Coordinator(config)
        from federation._errors import QueryError

        with pytest.raises(QueryError) as err:
            coordinator.run("SELECT COUNT(*) FROM lycee_students", fed.researcher)
        # the node was asked under the coordinator's 1 s deadline (the wire rounds it up a
        # little), and the coordinator answered without its result: the call ended at the
        # node by that deadline
        assert slow.deadlines and all(d is not None and d < 1.5 for d in slow.deadlines)
        assert slow.abandoned.wait(10)
        assert err.value.code == "evaluation_failed" and err.value.nodes == {}
        assert "slow" not in err.value.message
        coordinator.close()
    finally:
        slow.release.set()
        server.stop(None).wait()
        fed.close()


def test_result_frame_handles_nulls_and_types() -> None:
    from enclave._client import result_frame

    df = result_frame({"columns": [{"name": "k", "type": "string"},
                                   {"name": "n", "type": "integer"},
                                   {"name": "m", "type": "number"}],
                       "rows": [["a", None, None], ["b", 3, 1.5]],
                       "suppressed": [[False, True, True], [False, False, False]]})
    assert df["n"].isna().tolist() == [True, False]
    assert pd.isna(df["m"][0]) and df["m"][1] == 1.5
    assert df.bulle.suppressed.values.tolist() == [[False, True, True], [False] * 3]
