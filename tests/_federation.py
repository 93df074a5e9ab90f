"""Test harness: real node gRPC servers (mTLS, free loopback ports) and a coordinator.

Nodes run in-process (their gRPC servers and DuckDB engines are the real ones); the
end-to-end demo test runs them as separate processes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation._config import (
    CoordinatorConfig,
    NodeEndpoint,
    ProjectConfig,
    Researcher,
    hash_token,
)
from federation._coordinator import Coordinator
from nodes._config import load_node_config
from nodes._engine import NodeEngine
from nodes._service import build_server

DATA = Path(os.environ.get("BULLE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
TOKEN = "test-token-researcher-0123456789"
OTHER_TOKEN = "test-token-other-researcher-98765"


class CountingEngine(NodeEngine):
    """A real engine that counts the plans it was asked to execute."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.executed = 0
        self._count_lock = threading.Lock()

    def execute(self, plan, *args, **kw):
        with self._count_lock:
            self.executed += 1
        return super().execute(plan, *args, **kw)  # with the servicer's deadline

    def execute_rows(self, plan, *args, **kw):
        with self._count_lock:
            self.executed += 1
        return super().execute_rows(plan, *args, **kw)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def node_toml(node_id: str, certs: Path, datasets: list[dict[str, Any]],
              extra: str = "") -> str:
    lines = [f'node_id = "{node_id}"', 'listen = "127.0.0.1:0"', extra, "", "[tls]",
             f'cert = "{certs / (node_id + ".pem")}"', f'key = "{certs / (node_id + ".key")}"',
             f'client_ca = "{certs / "ca.pem"}"', "", "[engine]", "threads = 1",
             'memory_limit = "512MB"']
    for ds in datasets:
        lines += ["", "[[dataset]]"] + [f"{k} = {_toml_value(v)}" for k, v in ds.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Federation:
    coordinator: Coordinator
    engines: dict[str, CountingEngine]
    servers: dict[str, Any]
    ports: dict[str, int]
    researcher: Researcher
    other: Researcher
    tmp: Path
    closers: list[Any] = field(default_factory=list)

    def run(self, sql: str) -> dict[str, Any]:
        return self.coordinator.run(sql, self.researcher)

    @property
    def executed(self) -> int:
        return sum(e.executed for e in self.engines.values())

    def stop_node(self, node_id: str) -> None:
        self.servers[node_id].stop(grace=None).wait()

    def close(self) -> None:
        self.coordinator.close()
        for s in self.servers.values():
            s.stop(grace=None).wait()
        for e in self.engines.values():
            e.close()


def start_federation(tmp: Path, certs: Path, nodes: dict[str, list[dict[str, Any]]],
                     node_timeout_s: float = 20.0, board_public_key: Path | None = None,
                     projects: tuple[ProjectConfig, ...] = (),
                     node_extra: dict[str, str] | None = None,
                     operators: dict[str, tuple[str, ...]] | None = None) -> Federation:
    """Nodes (real engines behind real gRPC servers) and a coordinator; ``node_extra``
    adds top-level TOML lines to some nodes' configs; ``operators``: hub user → nodes."""
    engines, servers, ports = {}, {}, {}
    extra = f'board_public_key = "{board_public_key}"' if board_public_key else ""
    for node_id, datasets in nodes.items():
        path = tmp / f"{node_id}.toml"
        more = (node_extra or {}).get(node_id, "")
        path.write_text(node_toml(node_id, certs, datasets, f"{extra}\n{more}".strip()))
        config = load_node_config(path)
        engine = CountingEngine(config)
        server, port = build_server(config, engine)
        engines[node_id], servers[node_id], ports[node_id] = engine, server, port
    researcher = Researcher("alice", hash_token(TOKEN), ("demo", "other-project"))
    other = Researcher("bob", hash_token(OTHER_TOKEN), ("bob-project",))
    config = CoordinatorConfig(
        listen="127.0.0.1:0", cert=certs / "bulle-coordinator.pem",
        key=certs / "bulle-coordinator.key", ca=certs / "ca.pem",
        nodes=tuple(NodeEndpoint(n, f"127.0.0.1:{p}") for n, p in ports.items()),
        researchers=(researcher, other), node_timeout_s=node_timeout_s, catalog_ttl_s=3600,
        state_dir=tmp / "coordinator", projects=projects, board_public_key=board_public_key,
        operators=operators or {},
    )
    return Federation(Coordinator(config), engines, servers, ports, researcher, other, tmp)


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
