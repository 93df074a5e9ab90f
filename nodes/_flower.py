"""The node's Flower side: a SuperNode next to the node agent, and our own task executor.

The SuperNode runs with ``--isolation process``: it never starts a ClientApp itself. Our
executor (a long-lived process of the node agent) takes its tasks from the SuperNode's
local Runtime API, and for each one:

- pulls the message and the FAB, computes sha256 of the FAB *content* and refuses any
  hash but the one of the FAB built from the code this node's operator installed
  (``bulle_flower._fab``). A refused FAB is never extracted nor imported: the node
  replies with an error. (A SuperNode imports the FAB's Python, and ``--trusted-entities``
  needs Flower's online hub: TRAPS.md.) With the hash equal, the FAB *is* the installed
  code, so the installed ClientApp runs — the FAB's bytes are never executed;
- forks a child for the task: the parent imported torch/opacus/flwr, loaded the data and
  warmed them up once (``_task_imports``), the child runs the round and ``os._exit``s.
  Same isolation as one process per task, without ~3 s of imports and ~1 s of first-call
  initialisation per message.

The SuperNode's local app I/O API answers only its executor: the agent draws a secret
for each start of the pair and gives it to both in the environment; the SuperNode's API is
fenced (``bulle_flower/_fence.py``: loopback and the secret, else 403) and the executor and
its task processes send it. Another process on the host cannot take the node's tasks (the
incoming model, the run's spec and authorisation) nor push a reply in the node's name.

Speed (TRAPS.md): the stock SuperNode sleeps a hard-coded 3 s after every empty pull and
0.5 s while it waits for a reply, and object pulls back off from 1 s. The SuperNode and the
executor cap these at ``BULLE_FLOWER_POLL_S`` (``bulle_flower/_patches.py``: private
names, flwr pinned to 1.42.0, ``tests/test_training.py`` fails when they change).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger("bulle.node.flower")
POLL_ENV = "BULLE_FLOWER_POLL_S"


# ------------------------------------------------------------------------ node key pair


def make_flower_key(private_path: Path) -> Path:
    """Create the node's SuperNode authentication key (EC P-384, OpenSSH format; the
    SuperLink refuses ed25519) unless it exists; returns the public key's path."""
    public_path = private_path.with_suffix(".pub")
    if not private_path.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()))
        public_path.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return public_path


# ---------------------------------------------------------------------------- SuperNode


def supernode_main(argv: list[str]) -> int:
    """``flower-supernode`` with the poll cap (``python -m nodes._flower supernode …``)."""
    from bulle_flower import (
        APPIO_SECRET_ENV,
        AppIoFence,
        cap_pull_backoff,
        cap_supernode_sleep,
        take_secret,
    )

    poll = float(os.environ.get(POLL_ENV, "0.2"))
    cap_supernode_sleep(poll)
    secret = take_secret(APPIO_SECRET_ENV)
    import flwr.supernode.main as supernode_app

    create_app = supernode_app.create_app

    def fenced_create_app(*a: Any, **kw: Any) -> Any:
        app = create_app(*a, **kw)
        app.add_middleware(AppIoFence, secret=secret)  # outermost
        return app

    supernode_app.create_app = fenced_create_app  # looked up when the API starts
    cap_pull_backoff(cap=max(poll, 0.05))
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True, colored=False)  # a node's log is a file

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


# ----------------------------------------------------------------------------- executor


def serve_executor(config_path: Path, runtime_address: str, poll_s: float) -> int:
    """Take ClientApp tasks from the local SuperNode and run each in a forked child."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    from bulle_flower import (
        APPIO_SECRET_ENV,
        IdleBackoff,
        SecretHeader,
        fab_sha256,
        take_secret,
    )
    from nodes import _training
    from nodes._config import load_node_config
    from nodes._engine import NodeEngine

    secret = take_secret(APPIO_SECRET_ENV)  # the SuperNode's app I/O answers only to it
    config = load_node_config(config_path)
    if config.training is None:
        raise SystemExit(f"node {config.node_id}: no [training] section in its config")
    coordinator_key = None
    if config.coordinator_public_key is not None:
        from privacy import load_public_key

        coordinator_key = load_public_key(config.coordinator_public_key)
    else:
        log.error("node %s: no coordinator_public_key in its config: every training message "
                  "will be refused", config.node_id)
    engine = NodeEngine(config)  # loads the data and locks DuckDB, before any fork
    from bulle_flower import cap_pull_backoff
    from bulle_flower.client_app import app as client_app

    cap_pull_backoff(cap=max(poll_s, 0.05))
    _task_imports(engine)  # a child must not spend its time importing or warming up

    state_dir = state_dir_of(engine)  # the node's ledger, audit, releases
    _training.bind(_training.NodeRuntime(config, engine, config.training.models, state_dir,
                                         coordinator_key))
    allowed = fab_sha256()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SecretHeader(secret)],
        retry_invoker=make_simple_http_retry_invoker())
    stop = threading.Event()
    children: set[int] = set()

    def on_signal(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("node %s: training executor ready (FAB sha256 %s, models %s)", config.node_id,
             allowed, ", ".join(config.training.models))
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    idle = IdleBackoff(poll_s)
    exit_code = 0
    while not stop.is_set():
        codes = _reap(children)
        if any(codes):
            # A task died without answering: its SuperNode would wait for that reply
            # forever. Exit, so that the node agent restarts the SuperNode and this executor.
            log.error("a training task exited abnormally (%s): restarting the pair", codes)
            exit_code = 3
            break
        if codes:
            _warm_accounting(state_dir)
        try:
            res = client.AcquireTask(request)
        except Exception as e:  # the SuperNode restarts or is not up yet: keep polling
            log.debug("AcquireTask failed: %s", e)
            stop.wait(max(poll_s, 0.5))
            continue
        if res.HasField("task") and res.token:
            idle.busy()
            pid = os.fork()
            if pid == 0:  # the task process
                code = 1
                try:
                    code = _run_task(runtime_address, res.token, allowed, client_app,
                                     secret)
                finally:
                    os._exit(code)
            children.add(pid)
            continue  # maybe another task is waiting
        stop.wait(idle.empty())
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    client.close()
    return exit_code


def _reap(children: set[int]) -> list[int]:
    """Collect finished task processes; their exit codes (0: answered)."""
    codes = []
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done:
            children.discard(pid)
            codes.append(os.waitstatus_to_exitcode(status) if status else 0)
    return codes


def _warm_accounting(state_dir: Path) -> None:
    """Compute, in the parent, the RDP of the node's latest charges: the next round of a
    run charges the same event, and its forked task then finds it in the cache instead of
    spending ~0.1 s on it. Plain sqlite3, closed at once: no connection crosses a fork."""
    import sqlite3

    from privacy import rdp_of_key

    try:
        db = sqlite3.connect(f"file:{state_dir / 'ledger.sqlite'}?mode=ro", uri=True)
        try:
            keys = {r[0] for r in db.execute("SELECT event FROM privacy_charges "
                                              "ORDER BY id DESC LIMIT 8")}
        finally:
            db.close()
        for key in keys:
            rdp_of_key(key)
    except (sqlite3.Error, ValueError) as e:  # an optimisation only
        log.debug("accounting warm-up skipped: %s", e)


def _task_imports(engine: Any) -> None:
    """Import and warm up in the parent what every task uses (children inherit it).

    Measured: a cold task spends ~0.9 s in first-call initialisation (autograd, Opacus
    hooks, DuckDB's first query) for 0.1 s of DP-SGD. The warm-up runs one DP-SGD step of
    each model on random data — after ``torch.set_num_threads(1)``, so no OpenMP pool exists
    when the parent forks (the reason TRAPS.md says "no torch op before forking"; tests run
    every task in a forked child of this warmed parent).
    """
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord  # noqa: F401
    from flwr.supercore.heartbeat import HeartbeatSender  # noqa: F401
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from bulle_flower.models import MODELS, build_model
    from privacy import gaussian_noise

    torch.set_num_threads(1)
    for kind in MODELS:
        x = torch.rand(64, 4, 3) if kind == "gru" else torch.rand(64, 3)
        model = build_model(kind, 3, 4, dp=True)
        data = DataLoader(TensorDataset(x, torch.rand(64).round()), batch_size=16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt, data = PrivacyEngine(accountant="rdp").make_private(
            module=model.train(), optimizer=opt, data_loader=data, noise_multiplier=1.0,
            max_grad_norm=1.0)
        for xb, yb in data:
            if len(xb):
                opt.zero_grad()
                torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb).backward()
                opt.step()
    gaussian_noise([0.0], 1.0)  # OpenDP's first measurement
    _warm_authorisation()  # a task checks one before anything else
    # DuckDB's and Arrow's first join and column conversions (~0.5 s cold): the shape of
    # a training view, for each table a node may train on and each open table it may join.
    meta = engine.meta
    for t in (m for m in meta.values() if m.tier != "open" and m.privacy_unit):
        for j in (m for m in meta.values() if m.tier == "open"):
            col = next((c for c in t.columns if c in j.columns and c != t.privacy_unit), None)
            if col is None:
                continue
            sql = (f'SELECT * FROM "{t.name}" AS t JOIN "{j.name}" AS j0 '
                   f'ON t."{col}" = j0."{col}" LIMIT 1000')
            table = engine.cursor().sql(sql).to_arrow_table()
            for column in table.columns:
                column.to_numpy(zero_copy_only=False)


def _warm_authorisation() -> None:
    """One run authorisation signed and verified with a throwaway key: a forked task then
    finds Ed25519 and the token's parsing initialised (its check: ~2 ms instead of ~3)."""
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privacy import RunAuthorisation, sign_run_authorisation, verify_run_authorisation

    key, now = Ed25519PrivateKey.generate(), datetime.now(UTC)
    auth = RunAuthorisation("warm-up", "warm-up", "0" * 64, "0" * 64, (("node", 1.0),),
                            now + timedelta(minutes=1), now - timedelta(minutes=1))
    verify_run_authorisation(sign_run_authorisation(auth, key), key.public_key(), now)


def _run_task(address: str, token: str, allowed: str, client_app: Any, secret: str) -> int:
    """One task: pull its input, check the FAB, run the installed ClientApp, push."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    from bulle_flower import SecretHeader
    from nodes import _training

    _training.TIMES["forked"] = time.time()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token), SecretHeader(secret)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, status, details = None, SubStatus.FAILED, "task failed"
    try:
        message, context, _run, fab = pull_task_input(client)
        _training.TIMES["pulled"] = time.time()
        digest = hashlib.sha256(fab.content).hexdigest()
        if digest != allowed:
            # Checked before anything of the FAB is unpacked: it is never imported.
            log.warning("refused a run whose FAB sha256 is %s (this node runs %s)", digest,
                        allowed)
            _audit_refused_fab(digest, allowed, message)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=(
                f"refused: this node runs only the training app its operator installed "
                f"(FAB sha256 {digest[:16]}…, expected {allowed[:16]}…)")), reply_to=message)
            details = "FAB refused"
        elif message.metadata.message_type != "train":
            reply = Message(Error(code=ErrorCode.UNKNOWN_MESSAGE_TYPE,
                                  reason="refused: only train messages are handled"),
                            reply_to=message)
        else:
            try:
                reply = client_app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
            except Exception:  # the detail may quote data: it stays in this node's log
                incident = uuid.uuid4().hex[:12]
                log.exception("training task failed (incident %s)", incident)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=f"node error (node incident {incident})"),
                                reply_to=message)
        push_message(client, reply, context)
        return 0
    except Exception:
        log.exception("training task failed")
        return 1
    finally:
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()


def _audit_refused_fab(digest: str, allowed: str, message: Any) -> None:
    from nodes._training import _runtime
    from privacy import AuditLog

    rt = _runtime()
    audit = AuditLog(rt.state_dir / "audit.sqlite")
    audit.append("?", "?", "train_fab_refused", {
        "node": rt.node_id, "run_id": str(message.metadata.run_id), "fab_sha256": digest,
        "expected_sha256": allowed})
    audit.close()


# --------------------------------------------------------------- processes of the agent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def state_dir_of(engine: Any) -> Path:
    """The node's state folder, as its engine (``nodes/_engine.py``) chose it: the ledger
    and audit are there, and so are the training releases and the SuperNode's home."""
    return Path(engine.guard.audit.path).parent


class NodeFlower:
    """The SuperNode and the executor, started by ``bulle node serve``, stopped by PID.

    ``state_dir``: the node engine's (``state_dir_of``); the SuperNode's Flower home is
    its ``flower`` folder."""

    def __init__(self, config: Any, config_path: Path, state_dir: Path,
                 superlink: str | None = None) -> None:
        self.config = config
        self.training = config.training
        self.config_path = config_path
        self.state_dir = state_dir
        self.superlink = superlink or self.training.superlink
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()

    def start(self) -> None:
        t = self.training
        state = self.state_dir / "flower"  # in the engine's state folder
        state.mkdir(parents=True, exist_ok=True)
        port = t.runtime_port or free_port()
        runtime = f"127.0.0.1:{port}"
        bindir = str(Path(sys.executable).parent)
        from bulle_flower import APPIO_SECRET_ENV, new_secret

        env = {**os.environ, "FLWR_HOME": str(state), POLL_ENV: str(t.poll_interval_s),
               "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
               APPIO_SECRET_ENV: new_secret()}  # the pair's app I/O secret
        supernode = [sys.executable, "-m", "nodes._flower", "supernode",
                     "--superlink", self.superlink, "--root-certificates",
                     str(t.root_certificates), "--auth-supernode-private-key", str(t.auth_key),
                     "--isolation", "process", "--host", "127.0.0.1", "--port", str(port),
                     "--max-wait-time", "3600"]
        executor = [sys.executable, "-m", "nodes._flower", "executor", "--config",
                    str(self.config_path), "--runtime", runtime,
                    "--poll", str(t.poll_interval_s)]
        self._stopping.clear()
        for argv in (supernode, executor):
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent)
            self.procs.append(proc)
            threading.Thread(target=self._supervise, args=(len(self.procs) - 1, argv, env),
                             daemon=True).start()
        log.info("node %s: SuperNode (runtime %s) and executor started, SuperLink %s",
                 self.config.node_id, runtime, self.superlink)

    def _supervise(self, i: int, argv: list[str], env: dict[str, str]) -> None:
        """Restart a SuperNode or executor that exits (SuperLink down, key not yet
        registered: exit 305), 2 s later; never while stopping. The two go together:
        a SuperNode whose executor died mid-task waits forever for that task's reply."""
        while not self._stopping.is_set():
            code = self.procs[i].wait()
            if self._stopping.is_set():
                return
            other = self.procs[1 - i] if len(self.procs) == 2 else None
            if other is not None and other.poll() is None:
                other.terminate()
            if self._stopping.wait(2.0):
                return
            log.warning("node %s: %s exited (%s), restarting", self.config.node_id, argv[3],
                        code)
            self.procs[i] = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                             preexec_fn=_die_with_parent)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a SuperNode never outlives its node agent, even on SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    import argparse

    if argv and argv[0] == "supernode":
        return supernode_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m nodes._flower executor")
    parser.add_argument("cmd", choices=["executor"])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--runtime", required=True, help="the SuperNode's Runtime API")
    parser.add_argument("--poll", type=float, default=0.2)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's σ-search chatter
    return serve_executor(args.config, args.runtime, args.poll)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
