"""Board decisions from the CLI with the board's own key: a real coordinator over HTTP
(uvicorn on a free port) in front of a real node, no hub, no notebook server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from enclave._board import board_main
from federation._api import build_app
from privacy import BOARD_REQUEST_SCHEME, generate_board_keys, sign_board_request, verify_grant
from tests._federation import TOKEN, Federation, start_federation
from tests.conftest import depp
from tests.test_api import ServerThread


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("board")
    generate_board_keys(out)
    return out


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, certs: Path, board: Path
        ) -> Iterator[Federation]:
    # the coordinator holds the board's public key only (production): grants are signed
    # by the board, here by its CLI
    fed = start_federation(tmp_path_factory.mktemp("boardkey"), certs, {"depp": depp()},
                           board_public_key=board / "board_ed25519.pub.pem")
    yield fed
    fed.close()


@pytest.fixture(scope="module")
def url(fed: Federation) -> Iterator[str]:
    with ServerThread(build_app(fed.coordinator)) as base:
        yield base


def _submit(url: str, name: str) -> None:
    r = httpx.post(f"{url}/v1/projects", headers={"Authorization": f"Bearer {TOKEN}"}, json={
        "name": name, "title": "t", "purpose": "dropout research", "datasets": ["ips_colleges"],
        "epsilon": 2.0, "duration_days": 30})
    assert r.status_code == 201, r.text


def test_the_board_approves_and_refuses_with_its_own_key(url, fed, board, capsys) -> None:
    key = str(board / "board_ed25519.pem")
    _submit(url, "study-a")
    _submit(url, "study-b")
    assert board_main(["board", "approve", "study-a", "--url", url, "--key", key,
                       "--epsilon", "1.5", "--reason", "ok, less ε"]) == 0
    assert "study-a: approved (ε 1.5" in capsys.readouterr().out
    assert board_main(["board", "refuse", "study-b", "--url", url, "--key", key,
                       "--reason", "no purpose"]) == 0
    registry = fed.coordinator.projects.registry
    a, b = registry.get("study-a"), registry.get("study-b")
    assert (a.status, b.status) == ("approved", "refused")
    # the grant was signed by the CLI with the board's key, the coordinator only checked it
    grant = verify_grant(a.grant_token, board / "board_ed25519.pub.pem")
    assert (grant.project, grant.epsilon, grant.researchers) == ("study-a", 1.5, ("alice",))
    assert a.decided_by.startswith("board:")
    entries = list(fed.coordinator.projects.audit.entries())
    signed = [e for e in entries if e.action == "board_signed_request"]
    assert {e.detail["target"] for e in signed} >= {"/v1/projects/study-a/decision",
                                                  "/v1/projects/study-b/decision"}
    assert {e.action for e in entries if e.actor == a.decided_by} >= {
        "board_signed_request", "project_amended", "project_refused"}
    assert fed.coordinator.projects.audit.verify().ok
    assert board_main(["board", "list", "--url", url, "--key", key, "--json"]) == 0
    assert '"study-b"' in capsys.readouterr().out


def test_a_signed_request_is_good_once_for_that_request_only(url, board, tmp_path) -> None:
    key = (board / "board_ed25519.pem").read_bytes()
    token = sign_board_request(key, "GET", "/v1/projects", b"")
    auth = {"Authorization": f"{BOARD_REQUEST_SCHEME} {token}"}
    assert httpx.get(f"{url}/v1/projects", headers=auth).status_code == 200
    replay = httpx.get(f"{url}/v1/projects", headers=auth)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    other = sign_board_request(key, "GET", "/v1/projects", b"")
    r = httpx.get(f"{url}/v1/board/export", headers={
        "Authorization": f"{BOARD_REQUEST_SCHEME} {other}"})
    assert r.status_code == 401 and "another request" in r.json()["error"]["message"]
    body = b'{"decision":"refuse","reason":"x"}'
    signed = sign_board_request(key, "POST", "/v1/projects/nope/decision", b"{}")
    r = httpx.post(f"{url}/v1/projects/nope/decision", content=body, headers={
        "Authorization": f"{BOARD_REQUEST_SCHEME} {signed}",
        "Content-Type": "application/json"})
    assert r.status_code == 401  # the body is not the one signed
    generate_board_keys(tmp_path)  # someone else's key
    stranger = sign_board_request((tmp_path / "board_ed25519.pem").read_bytes(), "GET",
                                  "/v1/projects", b"")
    r = httpx.get(f"{url}/v1/projects",
                  headers={"Authorization": f"{BOARD_REQUEST_SCHEME} {stranger}"})
    assert r.status_code == 401 and "wrong_key" in r.json()["error"]["message"]


def test_the_board_key_cannot_query(url, board) -> None:
    key = (board / "board_ed25519.pem").read_bytes()
    body = b'{"sql":"SELECT COUNT(*) FROM ips_colleges"}'
    token = sign_board_request(key, "POST", "/v1/queries", body)
    r = httpx.post(f"{url}/v1/queries", content=body, headers={
        "Authorization": f"{BOARD_REQUEST_SCHEME} {token}", "Content-Type": "application/json"})
    assert r.status_code == 403


def test_show_finds_the_public_key_in_a_config(board, tmp_path, capsys, monkeypatch) -> None:
    grant = tmp_path / "g.grant"
    assert board_main(["board", "grant", "--key", str(board / "board_ed25519.pem"),
                       "--project", "p", "--researcher", "alice", "--dataset", "d",
                       "--epsilon", "1", "--purpose", "x", "--out", str(grant)]) == 0
    config = tmp_path / "node.toml"
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "board.pub.pem").write_bytes(
        (board / "board_ed25519.pub.pem").read_bytes())
    config.write_text('node_id = "n"\nboard_public_key = "keys/board.pub.pem"\n')
    capsys.readouterr()
    assert board_main(["board", "show", str(grant), "--config", str(config)]) == 0
    assert '"project": "p"' in capsys.readouterr().out
    monkeypatch.setenv("BULLE_DEMO_STATE", str(tmp_path / "none"))
    assert board_main(["board", "show", str(grant)]) == 2
    assert "--public-key or --config" in capsys.readouterr().err


def test_a_hub_or_config_token_still_works(url, capsys) -> None:
    _submit(url, "study-c")
    assert board_main(["board", "list", "--url", url, "--token", TOKEN]) == 0
    assert "study-c" in capsys.readouterr().out  # alice's own projects (her token's scope)


def test_a_replay_is_refused_after_a_restart_too(fed, board) -> None:
    """Nonces live in the coordinator's database: a request captured before a restart (a
    new app on the same database, as a new process or another replica) is still refused."""
    key = (board / "board_ed25519.pem").read_bytes()
    token = sign_board_request(key, "GET", "/v1/projects", b"")
    auth = {"Authorization": f"{BOARD_REQUEST_SCHEME} {token}"}
    with ServerThread(build_app(fed.coordinator)) as first:
        assert httpx.get(f"{first}/v1/projects", headers=auth).status_code == 200
    with ServerThread(build_app(fed.coordinator)) as restarted:
        replay = httpx.get(f"{restarted}/v1/projects", headers=auth)
        assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
        fresh = sign_board_request(key, "GET", "/v1/projects", b"")
        assert httpx.get(f"{restarted}/v1/projects", headers={
            "Authorization": f"{BOARD_REQUEST_SCHEME} {fresh}"}).status_code == 200
