"""Each node's audit entries, browsable from the board and the node page (issue 14): the
node's ``ListAudit`` over real gRPC with mutual TLS, the coordinator checking the links of
every page before showing it, paging, a failure's cause kept at the node, and who may see
which node (``[operators]``)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from federation._api import build_app
from federation._config import load_coordinator_config
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, SCOPE_QUERY, Caller
from federation._node_audit import PAGE_SIZE, node_audit_page
from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from privacy import audit_entry_hash
from tests._federation import TOKEN, Federation, start_federation
from tests.conftest import oulad, uci
from tests.test_api import ServerThread

BOARD = Caller("board", frozenset({SCOPE_APPROVE, SCOPE_AUDIT}), "hub")
GP_OPERATOR = Caller("op-gp", frozenset({SCOPE_AUDIT}), "hub")
V1_OPERATOR = Caller("op-v1", frozenset({SCOPE_AUDIT}), "hub")
RESEARCHER = Caller("alice", frozenset({SCOPE_QUERY}), "hub")
SECRET = "Could not convert string 'Dupont-4417' to INT32"  # a cause quoting a row


@pytest.fixture
def fed(tmp_path: Path, certs: Path) -> Iterator[Federation]:
    f = start_federation(tmp_path, certs, {"gp": uci("GP"), "v1": oulad(("AAA",))},
                         operators={"op-gp": ("gp",), "op-v1": ("v1",)})
    yield f
    f.close()


def _chain(fed: Federation, node: str) -> list[tuple[int, str, dict]]:
    return [(e.seq, e.hash, e.detail) for e in fed.engines[node].guard.audit.entries()]


def _shown(page: dict) -> list[tuple[int, str, dict]]:
    return [(e.seq, e.hash, e.detail) for e in page["entries"]]


def _fill(fed: Federation, node: str, n: int) -> None:
    """``n`` more entries on the node's own chain (as its guard appends them)."""
    audit = fed.engines[node].guard.audit
    for i in range(n):
        audit.append("alice", "demo", "refused", {"node": node, "request_id": f"r{i}",
                                                  "reason": "not allowed"})


def test_entries_listed_equal_the_nodes_chain(fed: Federation) -> None:
    for _ in range(3):
        fed.run("SELECT sex, COUNT(*) AS n FROM lycee_students GROUP BY sex")
    page = node_audit_page(fed.coordinator, "gp", None)
    assert page["error"] is None and page["head_seq"] == 3
    assert _shown(page) == _chain(fed, "gp")[::-1]  # newest first, every field as stored
    assert {e.action for e in page["entries"]} == {"released"}
    assert page["older"] is None and page["newer"] is None
    empty = node_audit_page(fed.coordinator, "v1", None)
    assert empty["error"] is None and empty["entries"] == [] and empty["head_seq"] == 0


def test_pages_cover_the_chain_once(fed: Federation) -> None:
    _fill(fed, "gp", 2 * PAGE_SIZE + 7)
    total = 2 * PAGE_SIZE + 7
    seen, before, pages = [], None, 0
    while True:
        page = node_audit_page(fed.coordinator, "gp", before)
        assert page["error"] is None and page["entries"]
        seen += _shown(page)
        pages += 1
        if page["older"] is None:
            break
        before = page["older"]
    assert pages == 3 and sorted(seen) == sorted(_chain(fed, "gp"))
    assert [s[0] for s in seen] == list(range(total, 0, -1))
    oldest = node_audit_page(fed.coordinator, "gp", 8)  # entries 1..7
    assert [e.seq for e in oldest["entries"]] == list(range(7, 0, -1))
    assert oldest["newer"] == 7 + PAGE_SIZE + 1


def _stub(fed: Federation, node: str, certs: Path, client: str = "bulle-coordinator"
          ) -> tuple[pb_grpc.NodeStub, grpc.Channel]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{client}.key").read_bytes(),
        certificate_chain=(certs / f"{client}.pem").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{fed.ports[node]}", creds)
    return pb_grpc.NodeStub(channel), channel


def test_a_failures_cause_stays_at_the_node(fed: Federation, certs: Path) -> None:
    fed.engines["gp"].guard.audit.append("alice", "demo", "failed", {
        "node": "gp", "request_id": "q1", "incident": "abc123", "cause": SECRET})
    _fill(fed, "gp", 1)  # the next entry's link covers the one shown without its cause
    stub, channel = _stub(fed, "gp", certs)
    try:  # what crosses the wire, as the coordinator's certificate receives it
        wire = stub.ListAudit(pb.AuditPageRequest(tail=True, limit=10), timeout=10)
    finally:
        channel.close()
    assert "Dupont" not in wire.SerializeToString().decode("utf-8", "replace")
    assert list(wire.entries[0].withheld) == ["cause"]
    page = node_audit_page(fed.coordinator, "gp", None)
    assert page["error"] is None
    failed = next(e for e in page["entries"] if e.action == "failed")
    assert failed.withheld == ("cause",) and "cause" not in failed.detail
    assert failed.detail["incident"] == "abc123"


def test_an_edited_entry_is_refused(fed: Federation) -> None:
    _fill(fed, "gp", 4)
    with sqlite3.connect(fed.engines["gp"].guard.audit.path) as db:
        db.execute("UPDATE audit_entries SET actor = 'mallory' WHERE seq = 2")
    page = node_audit_page(fed.coordinator, "gp", None)
    assert page["entries"] == [] and page["error"] == (
        "page refused: entry 2 does not match its hash")


def test_a_rehashed_entry_that_no_longer_links_is_refused(fed: Federation) -> None:
    _fill(fed, "gp", 4)
    audit = fed.engines["gp"].guard.audit
    e = next(x for x in audit.entries() if x.seq == 2)
    detail = {**e.detail, "reason": "rewritten"}
    digest = audit_entry_hash(2, e.time, e.actor, e.project, e.action, detail, e.prev_hash)
    with sqlite3.connect(audit.path) as db:  # self-consistent, but entry 3 links elsewhere
        db.execute("UPDATE audit_entries SET detail = json(?), hash = ? WHERE seq = 2",
                   (json.dumps(detail, sort_keys=True, separators=(",", ":")),
                    digest))
    page = node_audit_page(fed.coordinator, "gp", None)
    assert page["error"] == "page refused: entry 3 does not link to entry 2"
    # a page that ends before the rewritten entry still holds together
    assert node_audit_page(fed.coordinator, "gp", 2)["error"] is None


def test_a_rewritten_head_the_coordinator_saw_is_refused(fed: Federation) -> None:
    _fill(fed, "gp", 3)
    assert fed.coordinator.node_chains()["gp"]["head_seq"] == 3  # on the coordinator's record
    audit = fed.engines["gp"].guard.audit
    e = next(x for x in audit.entries() if x.seq == 3)
    detail = {**e.detail, "reason": "rewritten"}
    digest = audit_entry_hash(3, e.time, e.actor, e.project, e.action, detail, e.prev_hash)
    with sqlite3.connect(audit.path) as db:  # the whole tail rewritten, head row included
        db.execute("UPDATE audit_entries SET detail = ?, hash = ? WHERE seq = 3",
                   (json.dumps(detail, sort_keys=True, separators=(",", ":"),
                                             ensure_ascii=False), digest))
        db.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (digest,))
    assert audit.verify().ok  # alone, the node's chain looks fine
    page = node_audit_page(fed.coordinator, "gp", None)
    assert page["error"] == "page refused: entry 3 differs from the head the coordinator saw"


def test_no_other_certificate_reaches_the_entries(fed: Federation, certs: Path) -> None:
    stub, channel = _stub(fed, "gp", certs, client="intruder")
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.ListAudit(pb.AuditPageRequest(tail=True), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()


@pytest.mark.parametrize(("caller", "gp", "v1"), [
    (BOARD, 200, 200), (GP_OPERATOR, 200, 403), (V1_OPERATOR, 403, 200),
    (RESEARCHER, 403, 403)], ids=["board", "operator-gp", "operator-v1", "researcher"])
def test_who_sees_which_node(fed: Federation, caller: Caller, gp: int, v1: int,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    fed.run("SELECT COUNT(*) AS n FROM lycee_students")
    monkeypatch.setattr(fed.coordinator, "identify", lambda token: caller)
    with ServerThread(build_app(fed.coordinator)) as url:
        def get(path: str, **kw: bool) -> httpx.Response:
            return httpx.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=60, **kw)

        for node, want in (("gp", gp), ("v1", v1)):
            for path in (f"/operator/{node}", f"/board/audit?node={node}"):
                r = get(path)
                assert r.status_code == want, (path, r.status_code)
                assert want == 200 or "custom:bulle" not in r.text
        page = get("/board/audit?node=gp")
        if gp == 200:
            assert 'data-seq="1"' in page.text and "released" in page.text
            assert 'id="browse-node-audit"' in get("/operator/gp").text
        assert get("/board/audit?node=nowhere").status_code in (403, 404)
        nodes = get("/operator/", follow_redirects=False)
        if caller is GP_OPERATOR:  # an operator lands on their own node
            assert nodes.status_code == 302 and nodes.headers["location"] == "gp"
        elif caller is BOARD:
            assert 'id="node-link-gp"' in nodes.text and 'id="node-link-v1"' in nodes.text
            assert 'id="node-audit-gp"' in get("/board/").text


def test_operators_config(tmp_path: Path) -> None:
    base = ('[tls]\ncert = "c.pem"\nkey = "c.key"\nca = "ca.pem"\n')
    path = tmp_path / "coordinator.toml"
    path.write_text(base + '[operators]\n"demo-operator" = ["vendor-a"]\n')
    assert load_coordinator_config(path).operators == {"demo-operator": ("vendor-a",)}
    path.write_text(base + '[operators]\n"demo-operator" = "vendor-a"\n')
    with pytest.raises(Exception, match="each hub user = a list of node ids"):
        load_coordinator_config(path)
