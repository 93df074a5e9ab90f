"""Harness for DP training: a real SuperLink, real node agents (each with its SuperNode and
executor) as separate processes, and the coordinator (with its HTTP API) in this process.

Every process is started in its own session and stopped by PID in ``close()``; node agents
stop their SuperNode and executor themselves (and those die with them: PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from federation._config import (
    CoordinatorConfig,
    NodeEndpoint,
    ProjectConfig,
    Researcher,
    TrainingConfig,
    hash_token,
)
from federation._coordinator import Coordinator
from federation._superlink import control_client, control_token, register_nodes
from nodes._flower import free_port, make_flower_key
from privacy import AuditLog, Grant, Ledger, coordinator_keys, sign_grant
from tests._federation import DATA, TOKEN, node_toml

ROOT = Path(__file__).resolve().parents[1]
OULAD = DATA / "oulad"


def vendor_datasets(modules: tuple[str, ...]) -> list[dict[str, Any]]:
    """An OULAD vendor: assessments (open) and submissions (sensitive), for some modules."""
    mods = ", ".join(f"'{m}'" for m in modules)
    return [
        {"table": "assessments", "source": str(OULAD / "assessments.csv"), "tier": "open",
         "filter": f"code_module IN ({mods})",
         "public_domains": {"assessment_type": ["CMA", "Exam", "TMA"]}},
        {"table": "student_assessment", "source": str(OULAD / "studentAssessment.csv"),
         "tier": "sensitive", "privacy_unit": "id_student", "max_rows_per_unit": 20,
         "filter": "id_assessment IN (SELECT id_assessment FROM assessments)",
         "bounds": {"score": [0, 100], "date_submitted": [-30, 300], "is_banked": [0, 1]}},
    ]


def lycee_datasets(school: str) -> list[dict[str, Any]]:
    """UCI student performance, one row per pupil (no id column): ``privacy_unit = "row"``."""
    return [{"table": "lycee_students", "tier": "sensitive", "privacy_unit": "row",
             "source": str(DATA / "uci-student-performance" / "student-por.csv"),
             "filter": f"school = '{school}'",
             "public_domains": {"sex": ["F", "M"], "studytime": [1, 2, 3, 4],
                                "failures": [0, 1, 2, 3], "higher": ["no", "yes"],
                                "internet": ["no", "yes"]},
             "bounds": {"age": [15, 22], "absences": [0, 40], "g1": [0, 20], "g2": [0, 20],
                        "g3": [0, 20]}}]


def grant_token(board: Path, project: str, epsilon: float, researchers: tuple[str, ...] =
                ("alice",)) -> str:
    now = datetime.now(UTC)
    grant = Grant(project, researchers, ("student_assessment", "lycee_students"), epsilon, 1e-6,
                  now + timedelta(days=30), "testing DP training", now)
    return sign_grant(grant, (board / "board_ed25519.pem").read_bytes())


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not open after {timeout} s")


@dataclass
class TrainingFed:
    tmp: Path
    certs: Path
    board: Path
    superlink_port: int
    coordinator: Coordinator
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    researcher: Researcher | None = None
    server: Any = None
    url: str = ""

    @property
    def trainer(self) -> Any:
        return self.coordinator.trainer

    def state(self, node: str) -> Path:
        return self.tmp / "state" / node

    def ledger(self, node: str) -> Ledger:
        return Ledger(str(self.state(node) / "ledger.sqlite"))

    def audit(self, node: str) -> AuditLog:
        return AuditLog(self.state(node) / "audit.sqlite")

    def wait_ready(self, nodes: list[str], timeout: float = 120.0, times: int = 1) -> None:
        """Until each node's executor has loaded its data and imports (``times``: counting
        restarts)."""
        deadline = time.monotonic() + timeout
        for n in nodes:
            while self.logs[n].read_text(errors="replace").count(
                    "training executor ready") < times:
                if self.procs[n].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node {n} not ready:\n"
                                       f"{self.logs[n].read_text()[-3000:]}")
                time.sleep(0.2)

    def stop(self, name: str) -> None:
        proc = self.procs.get(name)
        _stop_groups([proc] if proc is not None else [])

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        for group in ([n for n in self.procs if n != "superlink"], ["superlink"]):
            _stop_groups([self.procs[n] for n in group])
        self.coordinator.close()


def _stop_groups(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each live process group, all at once (each takes a few seconds to
    stop), then SIGKILL to whatever did not exit within 15 s."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in live:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def start_training_federation(tmp: Path, certs: Path, board: Path,
                              nodes: dict[str, tuple[str, ...]],
                              grants: dict[str, float], *, poll_s: float = 0.05,
                              lycee: dict[str, str] | None = None,
                              node_env: dict[str, dict[str, str]] | None = None,
                              round_timeout_s: float = 60.0, http: bool = True) -> TrainingFed:
    """SuperLink + one node agent per entry of ``nodes`` (OULAD modules; ``lycee``: node →
    the school whose pupils it also holds) + coordinator, which signs run authorisations
    with a key the nodes' configs name."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BULLE_FLOWER_POLL_S": str(poll_s),
           "BULLE_SERVERAPP_POLL_S": str(poll_s)}
    sl_port = free_port()
    token_file = tmp / "coordinator" / "superlink-control.token"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    signing_key, coordinator_public = coordinator_keys(
        tmp / "coordinator" / "coordinator_ed25519.pem")

    def spawn(name: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        logs[name] = tmp / f"{name}.log"
        with logs[name].open("wb") as out:
            procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, cwd=ROOT,
                                           env={**env, **(extra or {})},
                                           start_new_session=True)

    try:
        spawn("superlink", [sys.executable, "-m", "bulle_cli", "coordinator", "superlink",
                            "--state", str(tmp / "superlink"), "--port", str(sl_port),
                            "--cert", str(certs / "bulle-superlink.pem"),
                            "--key", str(certs / "bulle-superlink.key"),
                            "--ca", str(certs / "ca.pem"),
                            "--control-token-file", str(token_file)])
        keys = {name: make_flower_key(tmp / "keys" / f"{name}.key") for name in nodes}
        _wait_port(sl_port, procs["superlink"], logs["superlink"], 60)
        # The platform admin registers the nodes' keys before their SuperNodes connect.
        client = control_client(f"127.0.0.1:{sl_port}", certs / "ca.pem",
                                control_token(token_file))
        register_nodes(client, keys)
        client.close()
        ports = {}
        salt = os.urandom(32)
        for name, modules in nodes.items():
            ports[name] = free_port()
            # One held-out split for the whole test federation: a learner at two nodes is
            # held out at both, so the tests can score models on never-trained learners.
            (tmp / "state" / name).mkdir(parents=True, exist_ok=True)
            (tmp / "state" / name / "training.salt").write_bytes(salt)
            cfg = tmp / f"{name}.toml"
            extra = (f'state_dir = "{tmp}/state/{name}"\n'
                     f'board_public_key = "{board}/board_ed25519.pub.pem"\n'
                     f'coordinator_public_key = "{coordinator_public}"\n'
                     f'[training]\nsuperlink = "127.0.0.1:{sl_port}"\n'
                     f'root_certificates = "{certs}/ca.pem"\n'
                     f'auth_key = "{tmp}/keys/{name}.key"\npoll_interval_s = {poll_s}\n')
            datasets = vendor_datasets(modules) + (
                lycee_datasets(lycee[name]) if name in (lycee or {}) else [])
            text = node_toml(name, certs, datasets, extra)
            cfg.write_text(text.replace('listen = "127.0.0.1:0"',
                                        f'listen = "127.0.0.1:{ports[name]}"'))
            spawn(name, [sys.executable, "-m", "bulle_cli", "node", "serve", "--config",
                         str(cfg)], (node_env or {}).get(name))
        for name in nodes:
            _wait_port(ports[name], procs[name], logs[name], 120)
        projects = []
        for project, epsilon in grants.items():
            path = tmp / f"{project}.grant"
            path.write_text(grant_token(board, project, epsilon))
            projects.append(ProjectConfig(project, path, 0.5, False))
        researcher = Researcher("alice", hash_token(TOKEN), tuple(grants))
        config = CoordinatorConfig(
            listen="127.0.0.1:0", cert=certs / "bulle-coordinator.pem",
            key=certs / "bulle-coordinator.key", ca=certs / "ca.pem",
            nodes=tuple(NodeEndpoint(n, f"127.0.0.1:{p}") for n, p in ports.items()),
            researchers=(researcher,), node_timeout_s=20, catalog_ttl_s=3600,
            state_dir=tmp / "coordinator", projects=tuple(projects),
            board_public_key=board / "board_ed25519.pub.pem",
            training=TrainingConfig(
                superlink=f"127.0.0.1:{sl_port}", root_certificates=certs / "ca.pem",
                control_token_file=token_file, node_keys={n: Path(k) for n, k in keys.items()},
                work_dir=tmp / "coordinator" / "training", signing_key=Path(signing_key),
                round_timeout_s=round_timeout_s))
        coordinator = Coordinator(config)
    except BaseException:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        raise
    fed = TrainingFed(tmp, certs, board, sl_port, coordinator, procs, logs, researcher)
    try:
        from federation._api import build_app

        app = build_app(coordinator)  # also creates coordinator.trainer
        if http:
            import uvicorn

            port = free_port()
            fed.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                       log_level="warning"))
            threading.Thread(target=fed.server.run, daemon=True).start()
            deadline = time.monotonic() + 10
            while not fed.server.started:
                if time.monotonic() > deadline:
                    raise TimeoutError("uvicorn did not start")
                time.sleep(0.02)
            fed.url = f"http://127.0.0.1:{port}"
        fed.wait_ready(list(nodes))
    except BaseException:
        fed.close()
        raise
    return fed
