"""The spawn broker: the one root process of the hub side (issue 12, DESIGN.md "Processes and
users"). The hub runs as a service user; to start a person's server as that person's own
system user it asks this broker over a Unix socket. The broker does only that:

- it answers only the hub's user (the socket is 0600 to that user, and the peer's uid is
  checked with ``SO_PEERCRED`` on every connection);
- it starts only the configured ``jupyterhub-singleuser``, only as ``jupyter-<hub name>``
  (created at the first start, home 0700 seeded with the examples), never as root or as a
  service account, in a mount namespace where the data holders' sources are covered;
- it signals only the servers it started, and only with 0, SIGINT, SIGTERM or SIGKILL.

So a compromised hub can act as any researcher (as it could anyway) but cannot read pupil
rows, keys or the ledgers. This is sudospawner's job without sudo: no sudoers file to
install on the host, and account creation stays in the broker.

Protocol: one JSON object per line each way. ``{"op": "start", "user", "argv", "env"}`` →
``{"pid"}``; ``{"op": "signal", "user", "signal"}`` → ``{"alive"}``; errors ``{"error"}``.
``BrokeredSpawner`` (``enclave/_hub.py``) is the hub's side.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import socketserver
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from enclave._users import PERSON_PREFIX, ensure_person_user, own, person_user

log = logging.getLogger("bulle.spawnbroker")
SIGNALS = frozenset({0, signal.SIGINT, signal.SIGTERM, signal.SIGKILL})
_MAX_REQUEST = 1 << 20  # a start request carries the server's environment: 1 MiB is plenty


class BrokerRefused(Exception):
    """A request the broker does not carry out; its text goes back to the hub."""


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (from the kernel)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def ensure_person(hub_name: str, homes: Path, prefix: str = PERSON_PREFIX) -> Any:
    """The system account of ``hub_name`` (``jupyter-<name>``), created with a 0700 home
    seeded with the example notebooks at the first start."""
    from enclave._hub import prepare_home

    name = person_user(hub_name, prefix)
    account = ensure_person_user(name, homes / name, f"Bulle hub user {hub_name}")
    if account.uid == 0:
        raise BrokerRefused(f"{name} is root")
    home = account.home
    if not home.exists():  # new home: filled as root, then handed over
        home.mkdir(mode=0o700, parents=True)
        prepare_home(home)
        own(home, account, 0o700, recursive=True, file_mode=0o644)
    return account


def become(system_user: str, hidden: list[str]) -> Callable[[], None]:
    """preexec_fn: cover ``hidden`` (still root), then drop to ``system_user``."""
    from jupyterhub.spawner import set_user_setuid

    hide, setuid = hide_paths(hidden), set_user_setuid(system_user)

    def preexec() -> None:
        hide()
        setuid()

    return preexec


_CLONE_NEWNS, _MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x20000, 1, 2, 4, 8
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18


def hide_paths(paths: list[str]) -> Callable[[], None]:
    """A function for a forked child (still root) that moves it into its own mount
    namespace and covers each of ``paths`` with an empty, read-only tmpfs of mode 000:
    opening anything under them then fails with a permission error. The covering
    mounts are locked for the unprivileged user it becomes (no way to unmount them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    unshare, mount = libc.unshare, libc.mount  # resolved before the fork
    flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    targets = [os.fsencode(p) for p in paths if os.path.isdir(p)]

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def hide() -> None:
        if not targets:
            return
        check(unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
        for t in targets:
            check(mount(b"tmpfs", t, b"tmpfs", flags, b"mode=000,size=4k"), "hide")

    return hide


class SpawnBroker:
    """The broker's state: the servers it started, by hub name."""

    def __init__(self, hub_uid: int, singleuser: str, homes: Path, hidden: list[str],
                 prefix: str = PERSON_PREFIX, output: int | None = None) -> None:
        self.hub_uid, self.singleuser = hub_uid, singleuser
        self.homes, self.hidden, self.prefix = homes, hidden, prefix
        self.output = output  # where the servers' output goes (the broker's log)
        self._servers: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op, user = request.get("op"), request.get("user")
        if not isinstance(user, str):
            raise BrokerRefused("no user")
        if op == "start":
            return self.start(user, request.get("argv"), request.get("env"))
        if op == "signal":
            return {"alive": self.signal(user, request.get("signal"))}
        raise BrokerRefused(f"unknown op {op!r}")

    def start(self, user: str, argv: Any, env: Any) -> dict[str, Any]:
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise BrokerRefused("argv must be a non-empty list of strings")
        if argv[0] != self.singleuser:
            raise BrokerRefused(f"only {self.singleuser} is started, not {argv[0]!r}")
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in env.items())):
            raise BrokerRefused("env must map strings to strings")
        try:
            account = ensure_person(user, self.homes, self.prefix)
        except (ValueError, RuntimeError) as e:
            raise BrokerRefused(str(e)) from None
        with self._lock:
            running = self._servers.get(user)
            if running is not None and running.poll() is None:
                raise BrokerRefused(f"the server of {user} is already running")
            env = {**env, "USER": account.name, "LOGNAME": account.name,
                   "HOME": str(account.home), "SHELL": "/bin/bash"}
            proc = subprocess.Popen(argv, env=env,  # set_user_setuid enters the home
                                    preexec_fn=become(account.name, self.hidden),
                                    start_new_session=True, stdin=subprocess.DEVNULL,
                                    stdout=self.output, stderr=subprocess.STDOUT)
            self._servers[user] = proc
        log.info("started the server of %s as %s (pid %d)", user, account.name, proc.pid)
        return {"pid": proc.pid}

    def signal(self, user: str, sig: Any) -> bool:
        """Send ``sig`` to ``user``'s server; whether it was still running."""
        if sig not in SIGNALS:
            raise BrokerRefused(f"signal {sig!r} is not one the hub may send")
        with self._lock:
            proc = self._servers.get(user)
            if proc is None or proc.poll() is not None:
                self._servers.pop(user, None)
                return False
            if sig:
                proc.send_signal(sig)
            return True

    def stop_all(self, grace: float = 5.0) -> None:
        """On shutdown: every server it started gets SIGTERM, then SIGKILL."""
        with self._lock:
            procs = [p for p in self._servers.values() if p.poll() is None]
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        broker = self.server.broker
        try:
            if peer_uid(self.connection) != broker.hub_uid:
                raise BrokerRefused("only the hub's user may use the spawn broker")
            line = self.rfile.readline(_MAX_REQUEST)
            reply = broker.handle(json.loads(line))
        except BrokerRefused as e:
            log.warning("refused: %s", e)
            reply = {"error": str(e)}
        except (ValueError, OSError) as e:
            log.warning("bad request: %s", e)
            reply = {"error": f"bad request: {e}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, broker: SpawnBroker) -> None:
        self.broker = broker
        super().__init__(path, _Handler)


def serve(socket_path: Path, broker: SpawnBroker, hub_gid: int) -> _Server:
    """Listen on ``socket_path`` (0600, owned by the hub's user) until shut down."""
    socket_path.unlink(missing_ok=True)
    old = os.umask(0o177)  # never world-connectable, not even between bind and chmod
    try:
        server = _Server(str(socket_path), broker)
    finally:
        os.umask(old)
    os.chown(socket_path, broker.hub_uid, hub_gid)
    return server


def main(argv: list[str] | None = None) -> None:
    import pwd

    p = argparse.ArgumentParser(prog="python -m enclave._spawnbroker", description=__doc__)
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--hub-user", required=True, help="the only user that may connect")
    p.add_argument("--singleuser", required=True, help="the only program it starts")
    p.add_argument("--homes", type=Path, default=Path("/home"))
    p.add_argument("--hide", default="", help="folders covered in notebooks (':'-separated)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the spawn broker runs as root (it starts servers as other users)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    hub = pwd.getpwnam(args.hub_user)
    if hub.pw_uid == 0:
        raise SystemExit("the hub must not run as root: pass its service user")
    broker = SpawnBroker(hub.pw_uid, args.singleuser, args.homes,
                         [h for h in args.hide.split(os.pathsep) if h], output=None)
    server = serve(args.socket, broker, hub.pw_gid)

    def shutdown(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    log.info("spawn broker on %s for uid %d", args.socket, hub.pw_uid)
    try:
        server.serve_forever()
    finally:
        broker.stop_all()
        server.server_close()
        args.socket.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
