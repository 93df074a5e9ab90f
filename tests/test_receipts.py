"""Signed release receipts (issue 17): real nodes over gRPC + mTLS, the coordinator, the
HTTP API and the SDK. A receipt verifies offline with the published keys and fails after
any change: a released number, the ε, the query text or hash, a node's statement, a key."""

from __future__ import annotations

import base64
import copy
import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from enclave import ReceiptError, connect, verify_receipt
from federation._api import build_app
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller
from privacy import generate_board_keys, public_key_entry
from tests._federation import TOKEN, Federation
from tests.test_api import ServerThread
from tests.test_sensitive_tier import dp_federation

DP_SQL = "SELECT is_banked, COUNT(*) AS n, AVG(score) AS s FROM student_assessment GROUP BY 1"
OPEN_SQL = "SELECT assessment_type, COUNT(*) AS n FROM assessments GROUP BY 1"
BOARD_TOKEN = "board-token-for-receipts"


class _BoardHub:
    """Stands in for the hub's token check: one board member's token."""

    def identify(self, token: str) -> Caller | None:
        return Caller("board-member", frozenset({SCOPE_APPROVE, SCOPE_AUDIT}), "hub") \
            if token == BOARD_TOKEN else None

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Federation]:
    board = tmp_path_factory.mktemp("receipts-board")
    generate_board_keys(board)
    fed = dp_federation(tmp_path_factory.mktemp("receipts"), certs, board, epsilon=1000.0)
    fed.coordinator.hub = _BoardHub()  # type: ignore[assignment]
    yield fed
    fed.coordinator.hub = None
    fed.close()


@pytest.fixture(scope="module")
def url(fed: Federation) -> Iterator[str]:
    with ServerThread(build_app(fed.coordinator)) as base:
        yield base


@pytest.fixture(scope="module")
def released(url: str) -> tuple[Any, dict[str, Any]]:
    """A DP release through the SDK, and the published keys."""
    hub = connect(url, TOKEN)
    df = hub.sql(DP_SQL, epsilon=0.5, progress=False)
    return df, hub.keys()


def _payload(token: str) -> dict[str, Any]:
    p64 = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(p64 + "=" * (-len(p64) % 4)))


def _repacked(token: str, **changes: Any) -> str:
    """The token with its payload changed and the old signature kept (a forgery)."""
    data = {**_payload(token), **changes}
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    p64 = base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()
    return f"{p64}.{token.split('.')[1]}"


def _fails(receipt: dict[str, Any], keys: Any, code: str) -> str:
    with pytest.raises(ReceiptError) as e:
        verify_receipt(receipt, keys)
    assert e.value.code == code, e.value
    return e.value.reason


def test_a_dp_release_carries_a_receipt_that_verifies(released) -> None:
    df, keys = released
    receipt = df.bulle.receipt
    signed = verify_receipt(df, keys)
    assert signed["epsilon"] == pytest.approx(df.bulle.epsilon_spent) and signed["epsilon"] > 0
    assert signed["tier"] == "sensitive" and len(signed["grant"]) == 64
    assert {n["node"] for n in signed["nodes"]} == {"v1", "v2"}
    for node in signed["nodes"]:
        assert node["epsilon"] == pytest.approx(0.5) and node["plan_sha256"] == \
            signed["plan_sha256"] and node["grant"] == signed["grant"]
    assert receipt["query"] == DP_SQL and receipt["released"]["rows"] == \
        [list(r) for r in df.itertuples(index=False)]
    # Nothing of the nodes' partials: a commitment per node, no hash of a partial, no salt
    text = json.dumps(receipt)
    assert "salt" not in text and "arrow" not in text
    assert verify_receipt(receipt, keys) == signed


def test_signing_keys_are_private_files(fed: Federation) -> None:
    import stat

    states = [fed.coordinator.config.state, *(e.state_dir for e in fed.engines.values())]
    assert len(states) == 3
    for state in states:
        key = state / "receipt_ed25519.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert (state / "receipt_ed25519.pub.pem").is_file()


def test_any_change_fails_with_a_reason(released) -> None:
    df, keys = released
    receipt = df.bulle.receipt
    number = copy.deepcopy(receipt)
    number["released"]["rows"][0][1] += 1
    assert "released values" in _fails(number, keys, "values_changed")
    interval = copy.deepcopy(receipt)
    interval["released"]["ci_high"][0][1] += 0.001
    _fails(interval, keys, "values_changed")
    eps = copy.deepcopy(receipt)
    eps["summary"]["epsilon"] = 0.01
    _fails(eps, keys, "summary_changed")
    eps["summary"].pop("epsilon")
    eps["statement"] = _repacked(receipt["statement"], epsilon=0.01)
    _fails(eps, keys, "bad_signature")
    text = dict(receipt, query=DP_SQL.replace("COUNT", "count"))
    _fails(text, keys, "query_changed")
    qhash = dict(receipt, summary={}, statement=_repacked(receipt["statement"],
                                                          query_sha256="0" * 64))
    _fails(qhash, keys, "bad_signature")
    nodes = _payload(receipt["statement"])["nodes"]
    node = _repacked(nodes[0], epsilon=0.001)
    forged = dict(receipt, summary={}, statement=_repacked(receipt["statement"],
                                                           nodes=[node, *nodes[1:]]))
    _fails(forged, keys, "bad_signature")  # the coordinator signed the node statements


def test_a_forged_node_statement_or_a_wrong_key_fails(released, tmp_path: Path) -> None:
    df, keys = released
    receipt = df.bulle.receipt
    from privacy import receipt_keys, sign_release

    # Someone with their own "coordinator" key re-signs with a changed node statement.
    fake, _ = receipt_keys(tmp_path / "fake.pem")
    nodes = _payload(receipt["statement"])["nodes"]
    s = _payload(receipt["statement"])
    forged = sign_release(fake.read_bytes(), query=s["query"], query_sha256=s["query_sha256"],
                          plan_sha256=s["plan_sha256"], grant=s["grant"], project=s["project"],
                          tier=s["tier"], epsilon=s["epsilon"], result=receipt["released"],
                          node_statements=[_repacked(nodes[0], epsilon=0.001), *nodes[1:]])
    assert "not among the published keys" in _fails(forged, keys, "unknown_key")
    # ... and with its key published as the coordinator's, the node's statement fails.
    with_fake = {"keys": [public_key_entry("coordinator", "coordinator", fake.read_bytes()),
                          *[k for k in keys["keys"] if k["role"] == "node"]]}
    assert "node" in _fails(forged, with_fake, "bad_signature")
    # a node key is not a coordinator key, whatever it signs
    swapped = {"keys": [dict(k, role="node") for k in keys["keys"]]}
    _fails(receipt, swapped, "wrong_key")
    only_nodes = {"keys": [k for k in keys["keys"] if k["role"] == "node"]}
    _fails(receipt, only_nodes, "unknown_key")


def test_open_data_releases_carry_receipts_too(url: str) -> None:
    hub = connect(url, TOKEN)
    df = hub.sql(OPEN_SQL, progress=False)
    signed = verify_receipt(df, hub.keys())
    assert signed["epsilon"] == 0 and signed["grant"] == "" and len(signed["nodes"]) == 2


def test_cli_verifies_a_saved_receipt(released, tmp_path: Path) -> None:
    df, keys = released
    path = Path(df.bulle.save_receipt(tmp_path / "receipt.json"))
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))

    def cli(file: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bulle_cli", "receipt", "verify",
                               str(file), "--keys", str(keys_file)],
                              capture_output=True, text=True, timeout=120)

    ok = cli(path)
    assert ok.returncode == 0 and "receipt valid" in ok.stdout, ok.stderr
    changed = json.loads(path.read_text())
    changed["released"]["rows"][0][1] += 1
    bad = tmp_path / "changed.json"
    bad.write_text(json.dumps(changed))
    out = cli(bad)
    assert out.returncode == 1 and "released values differ" in out.stderr


def test_the_board_looks_a_receipt_up_and_a_researcher_cannot(released, url: str) -> None:
    df, keys = released
    receipt = df.bulle.receipt

    def get(key: str, token: str) -> httpx.Response:
        return httpx.get(f"{url}/v1/receipts/{key}",
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)

    for key in (receipt["id"], receipt["sha256"]):
        r = get(key, BOARD_TOKEN)
        assert r.status_code == 200, r.text
        assert r.json()["statement"] == receipt["statement"]
        verify_receipt(r.json(), keys)
    assert get(receipt["id"], TOKEN).status_code == 403
    assert get("f" * 32, BOARD_TOKEN).status_code == 404
    assert httpx.get(f"{url}/v1/keys", timeout=30).status_code == 200  # public: no token


def test_the_coordinator_refuses_a_statement_that_is_not_about_the_merged_partial(
        fed: Federation) -> None:
    """A node's statement must commit to the partial the coordinator merges, for its plan."""
    from federation._errors import QueryError
    from federation.proto import bulle_pb2 as pb
    from nodes._receipts import NodeReceipts

    fed.coordinator.catalog()  # the nodes' keys
    plan = pb.Plan(request_id="r" * 32, query_sha256="0" * 64)
    signer = NodeReceipts("v1", fed.engines["v1"].state_dir)
    good = signer.sign(plan, pb.PartialResult(node_id="v1", arrow_ipc=b"partial", tier="open"))
    result = {"columns": [], "rows": []}

    def issue(part: pb.PartialResult, p: pb.Plan = plan) -> dict[str, Any]:
        return fed.coordinator.receipts.issue("r" * 32, "demo", "0" * 64, p, "open", 0.0,
                                             result, [part])

    assert issue(good)["summary"]["tier"] == "open"
    for bad, why in ((pb.PartialResult(), "another partial"),
                     (pb.PartialResult(), "another node"),
                     (pb.PartialResult(), "no statement")):
        bad.CopyFrom(good)
        if why == "another partial":
            bad.arrow_ipc = b"partial, changed"
        elif why == "another node":
            bad.node_id = "v2"
        else:
            bad.receipt_statement = ""
        with pytest.raises(QueryError, match="receipt statement is invalid"):
            issue(bad)
    with pytest.raises(QueryError, match="another node or plan"):
        issue(good, pb.Plan(request_id="r" * 32, query_sha256="1" * 64))


def test_a_retired_key_still_verifies_what_it_signed_before(released) -> None:
    """``/v1/keys`` keeps retired keys with the time they were replaced: a receipt signed
    before verifies, a statement dated after the retirement does not."""
    df, keys = released
    receipt = df.bulle.receipt
    issued = datetime.fromisoformat(_payload(receipt["statement"])["issued"])

    def retired_at(role: str, when: datetime) -> dict[str, Any]:
        return {"keys": [dict(k, retired=when.isoformat()) if k["role"] == role else k
                         for k in keys["keys"]]}

    later, earlier = issued + timedelta(hours=1), issued - timedelta(hours=1)
    assert verify_receipt(receipt, retired_at("coordinator", later)) == \
        verify_receipt(receipt, keys)
    verify_receipt(receipt, retired_at("node", later))
    assert "retired" in _fails(receipt, retired_at("coordinator", earlier), "retired_key")
    assert "retired" in _fails(receipt, retired_at("node", earlier), "retired_key")


def test_the_key_history_survives_restarts_and_retires_replaced_keys(tmp_path: Path) -> None:
    from federation._receipts import Receipts
    from federation.proto import bulle_pb2 as pb
    from privacy import receipt_keys

    state = tmp_path / "coordinator"
    state.mkdir()
    _, old_pub = receipt_keys(tmp_path / "n1-old.pem")
    _, new_pub = receipt_keys(tmp_path / "n1-new.pem")
    first = Receipts(state)
    first.learn({"n1": pb.Catalog(receipt_public_key=old_pub.read_text())})
    first.learn({"n1": pb.Catalog(receipt_public_key=new_pub.read_text())})  # pinned: ignored
    published = first.keys()["keys"]
    assert [(k["owner"], k["role"]) for k in published] == [("coordinator", "coordinator"),
                                                            ("n1", "node")]
    assert not any("retired" in k for k in published)
    old_kid = published[1]["kid"]
    # a restart: the node now publishes another key, the coordinator renewed its own
    (state / "receipt_ed25519.pem").unlink()
    (state / "receipt_ed25519.pub.pem").unlink()
    second = Receipts(state)
    second.learn({"n1": pb.Catalog(receipt_public_key=new_pub.read_text())})
    published = second.keys()["keys"]
    current = [k for k in published if "retired" not in k]
    retired = [k for k in published if "retired" in k]
    assert [k["owner"] for k in current] == ["coordinator", "n1"]
    assert sorted(k["owner"] for k in retired) == ["coordinator", "n1"]
    assert old_kid in {k["kid"] for k in retired}
    assert current[0]["pem"] == second.public_pem != first.public_pem
    assert stat.S_IMODE((state / "receipt_keys.json").stat().st_mode) == 0o600
    # the same keys again: nothing changes
    third = Receipts(state)
    third.learn({"n1": pb.Catalog(receipt_public_key=new_pub.read_text())})
    assert third.keys() == second.keys()
