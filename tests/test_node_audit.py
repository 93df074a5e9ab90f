"""The board's view of the nodes' audit chains: VerifyAudit over real gRPC, checkpoints
kept in the coordinator's own chain, tampering caught even when a node rewrites its log
into a self-consistent shorter one."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation._coordinator import NODE_CHAIN
from federation._dashboard import render_board, summary
from federation._hubauth import CONFIG_TOKEN_SCOPES, Caller
from tests._federation import Federation, start_federation
from tests.conftest import oulad, uci


@pytest.fixture
def fed(tmp_path: Path, certs: Path) -> Iterator[Federation]:
    f = start_federation(tmp_path, certs, {"gp": uci("GP"), "v1": oulad(("AAA",))})
    yield f
    f.close()


def _audit_db(fed: Federation, node: str) -> Path:
    return fed.engines[node].guard.audit.path


def test_chains_verified_and_checkpoints_recorded(fed: Federation) -> None:
    for _ in range(3):
        fed.run("SELECT sex, COUNT(*) AS n FROM lycee_students GROUP BY sex")
    chains = fed.coordinator.node_chains()
    assert chains["gp"]["ok"] and chains["gp"]["entries"] == 3
    assert chains["gp"]["head_seq"] == 3 and chains["v1"]["entries"] == 0
    checked = [e for e in fed.coordinator.projects.audit.entries() if e.action == NODE_CHAIN]
    assert {e.detail["node"] for e in checked} == {"gp", "v1"}
    fed.coordinator.node_chains()  # nothing moved: nothing new on the record
    assert len([e for e in fed.coordinator.projects.audit.entries()
                if e.action == NODE_CHAIN]) == 2
    fed.run("SELECT COUNT(*) AS n FROM lycee_students")
    assert fed.coordinator.node_chains()["gp"]["head_seq"] == 4
    assert fed.coordinator.projects.audit.verify().ok


def test_an_edited_entry_is_caught(fed: Federation) -> None:
    fed.run("SELECT COUNT(*) AS n FROM lycee_students")
    fed.run("SELECT sex, COUNT(*) AS n FROM lycee_students GROUP BY sex")
    with sqlite3.connect(_audit_db(fed, "gp")) as db:
        db.execute("UPDATE audit_entries SET detail = replace(detail, 'released', 'x') "
                   "WHERE seq = 1")
        db.execute("UPDATE audit_entries SET actor = 'mallory' WHERE seq = 1")
    chains = fed.coordinator.node_chains()
    assert chains["gp"]["ok"] is False and chains["gp"]["first_bad_seq"] == 1
    assert "does not match its hash" in chains["gp"]["reason"]
    assert chains["v1"]["ok"] is True
    board = Caller("board", CONFIG_TOKEN_SCOPES, "config", ())
    html = render_board(board, summary(fed.coordinator), None, "")
    assert "✘ broken at entry 1: entry 1 does not match its hash" in html
    assert 'id="chain-ok"' in html  # the coordinator's own chain is fine


def test_a_consistent_rewrite_below_the_seen_head_is_caught(fed: Federation) -> None:
    for _ in range(3):
        fed.run("SELECT COUNT(*) AS n FROM lycee_students")
    assert fed.coordinator.node_chains()["gp"]["head_seq"] == 3  # the board saw entry 3
    with sqlite3.connect(_audit_db(fed, "gp")) as db:  # drop entry 3 and move the head back
        seq, digest = db.execute("SELECT seq, hash FROM audit_entries WHERE seq = 2").fetchone()
        db.execute("DELETE FROM audit_entries WHERE seq = 3")
        db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
    assert fed.engines["gp"].guard.audit.verify().ok  # alone, the node's chain looks fine
    chains = fed.coordinator.node_chains()
    assert chains["gp"]["ok"] is False
    assert "external checkpoint is at seq 3 but the log ends at 2" in chains["gp"]["reason"]


def test_a_node_that_is_down_is_named(fed: Federation) -> None:
    fed.stop_node("v1")
    chains = fed.coordinator.node_chains()
    assert chains["v1"] == {"status": "unreachable", "ok": None}
    assert chains["gp"]["ok"] is True
