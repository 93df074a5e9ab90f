"""The coordinator's node registry (federation/_noderegistry.py), with real nodes behind real
gRPC servers: `bulle coordinator nodes add|remove|list` change a running coordinator's
federation without a restart, every change is in its audit chain, and a removed node gets no
plan any more."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation._noderegistry import NodeRegistry, NodeRegistryError
from federation.cli import main as coordinator_cli
from nodes._config import load_node_config
from nodes._service import build_server
from privacy import AuditLog
from tests._federation import CountingEngine, node_toml, start_federation, wait_for


def _config_file(fed, certs: Path) -> Path:
    """The running coordinator's config as a file (what an operator's CLI reads)."""
    c = fed.coordinator.config
    lines = [f'listen = "{c.listen}"', f'state_dir = "{c.state_dir}"', "", "[tls]",
             f'cert = "{c.cert}"', f'key = "{c.key}"', f'ca = "{c.ca}"']
    for n in c.nodes:
        lines += ["", "[[node]]", f'id = "{n.id}"', f'address = "{n.address}"']
    path = fed.tmp / "coordinator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _extra_node(fed, certs: Path, node_id: str, datasets: list) -> tuple[object, int]:
    path = fed.tmp / f"{node_id}.toml"
    path.write_text(node_toml(node_id, certs, datasets))
    engine = CountingEngine(load_node_config(path))
    server, port = build_server(load_node_config(path), engine)
    fed.engines[node_id], fed.servers[node_id] = engine, server
    return engine, port


def test_nodes_join_and_leave_a_running_coordinator(tmp_path: Path, certs: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import uci

    fed = start_federation(tmp_path, certs, {"gp": uci("GP")})
    try:
        cfg = _config_file(fed, certs)
        assert fed.run("SELECT COUNT(*) FROM lycee_students")["rows"] == [[423]]
        ms, port = _extra_node(fed, certs, "ms", uci("MS"))
        # Joins: the CLI writes the registry; the coordinator follows without a restart.
        assert coordinator_cli(["coordinator", "nodes", "add", "ms", f"127.0.0.1:{port}",
                                "--config", str(cfg), "--actor", "operator-7"]) == 0
        wait_for(lambda: "ms" in fed.coordinator.clients, timeout=10)
        wait_for(lambda: "ms" in fed.coordinator.catalog()["lycee_students"].nodes, 10)
        assert fed.run("SELECT COUNT(*) FROM lycee_students")["rows"] == [[649]]
        assert ms.executed == 1
        capsys.readouterr()
        assert coordinator_cli(["coordinator", "nodes", "list", "--config", str(cfg)]) == 0
        listed = capsys.readouterr().out
        assert "gp" in listed and "config" in listed
        assert f"127.0.0.1:{port}" in listed and "operator-7" in listed
        # Leaves: no plan reaches it any more.
        assert coordinator_cli(["coordinator", "nodes", "remove", "ms",
                                "--config", str(cfg), "--actor", "operator-7"]) == 0
        wait_for(lambda: "ms" not in fed.coordinator.clients, timeout=10)
        wait_for(lambda: "ms" not in fed.coordinator.catalog()["lycee_students"].nodes, 10)
        assert fed.run("SELECT COUNT(*) FROM lycee_students")["rows"] == [[423]]
        assert ms.executed == 1
        # A config node can be removed too, and every change is audited, in the chain.
        assert coordinator_cli(["coordinator", "nodes", "remove", "gp",
                                "--config", str(cfg)]) == 0
        wait_for(lambda: not fed.coordinator.clients, timeout=10)
        audit = AuditLog(fed.coordinator.config.state / "audit.sqlite")
        changes = [(e.action, e.detail["node"], e.actor) for e in audit.entries()
                   if e.action.startswith("node_")]
        assert changes[:2] == [("node_added", "ms", "operator-7"),
                               ("node_removed", "ms", "operator-7")]
        assert changes[2][:2] == ("node_removed", "gp")
        assert audit.verify().ok
    finally:
        fed.close()


def test_the_registry_refuses_what_it_cannot_route(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    registry = NodeRegistry(str(tmp_path / "ledger.sqlite"))
    for node_id, address in (("Bad Id", "h:1"), ("n", "no-port"), ("n", "h:1; rm -rf"),
                             ("../x", "h:1")):
        with pytest.raises(NodeRegistryError):
            registry.add(node_id, address, "op")
    with pytest.raises(NodeRegistryError, match="not in the federation"):
        registry.remove("ghost", "op")
    registry.add("n1", "node-1.example:7443", "op")
    registry.add("n1", "node-1.example:7444", "op")  # moved
    assert [(n.id, n.address) for n in registry.active()] == [("n1", "node-1.example:7444")]
    v = registry.version()
    registry.remove("n1", "op")
    assert registry.version() > v and registry.active() == ()
    with pytest.raises(NodeRegistryError):
        registry.remove("n1", "op")  # already gone
    registry.close()
