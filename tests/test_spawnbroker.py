"""The root spawn broker (enclave/_spawnbroker.py), on a real Unix socket: it answers only the
hub's user, starts only the configured program, only as ``jupyter-<name>``, with the data
holders' folders covered, and signals only what it started."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave._spawnbroker import SpawnBroker, serve
from enclave._users import mount_namespaces_work

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the broker runs as root")


def _ask(path: Path, request: object) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall((request if isinstance(request, bytes) else
                   json.dumps(request).encode()) + b"\n")
        return json.loads(s.makefile().readline())


def _broker(tmp_path: Path, hub_uid: int, singleuser: str = "/bin/sh",
            hidden: list[str] | None = None) -> Iterator[tuple[Path, SpawnBroker]]:
    broker = SpawnBroker(hub_uid, singleuser, tmp_path / "homes", hidden or [])
    (tmp_path / "homes").mkdir()
    sock = tmp_path / "spawn.sock"
    server = serve(sock, broker, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sock, broker
    finally:
        server.shutdown()
        server.server_close()
        broker.stop_all(grace=2)
        thread.join(5)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder other users can traverse (pytest's own tmp folders are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="bulle-broker-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def as_hub(open_tmp: Path) -> Iterator[tuple[Path, SpawnBroker]]:
    """A broker whose hub user is this test process (root here, for the test only)."""
    yield from _broker(open_tmp, os.geteuid(), hidden=[str(open_tmp / "secret")])


def test_socket_is_0600_and_other_users_are_refused(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    for sock, _ in _broker(tmp_path, nobody.pw_uid):
        assert sock.stat().st_mode & 0o777 == 0o600 and sock.stat().st_uid == nobody.pw_uid
        # root can still connect to a 0600 socket: the kernel's peer uid is what decides.
        reply = _ask(sock, {"op": "start", "user": "alice", "argv": ["/bin/sh"], "env": {}})
        assert reply == {"error": "only the hub's user may use the spawn broker"}
        with pytest.raises(KeyError):
            pwd.getpwnam("jupyter-alice-never")


@pytest.mark.parametrize("request_, error", [
    ({"op": "start", "user": "x", "argv": ["/bin/bash", "-c", "id"], "env": {}},
     "only /bin/sh is started"),
    ({"op": "start", "user": "x", "argv": [], "env": {}}, "argv must be"),
    ({"op": "start", "user": "x", "argv": ["/bin/sh"], "env": {"A": 1}}, "env must map"),
    ({"op": "start", "user": "../root", "argv": ["/bin/sh"], "env": {}},
     "no valid system account name"),
    ({"op": "start", "user": "Root", "argv": ["/bin/sh"], "env": {}},
     "no valid system account name"),
    ({"op": "signal", "user": "x", "signal": signal.SIGHUP}, "is not one the hub may send"),
    ({"op": "chown", "user": "x"}, "unknown op"),
    ({"op": "start", "argv": ["/bin/sh"], "env": {}}, "no user"),
    (b"{not json", "bad request"),
])
def test_requests_it_refuses(as_hub: tuple[Path, SpawnBroker], request_: object,
                             error: str) -> None:
    sock, _ = as_hub
    reply = _ask(sock, request_)
    assert error in reply.get("error", ""), reply


def test_a_server_runs_as_its_person_with_the_sources_covered(
        as_hub: tuple[Path, SpawnBroker], open_tmp: Path) -> None:
    sock, _ = as_hub
    secret = open_tmp / "secret"
    secret.mkdir(mode=0o755)
    (secret / "pupils.csv").write_text("id,grade\n1,12\n")
    name = f"bt{uuid.uuid4().hex[:8]}"  # a new account each run (its home is this run's)
    try:
        _run_as_person(sock, name, secret)
    finally:
        subprocess.run(["userdel", f"jupyter-{name}"], capture_output=True)


def _run_as_person(sock: Path, name: str, secret: Path) -> None:
    probe = ('import json, os, sys; r = {"uid": os.getuid(), "home": os.environ["HOME"], '
             '"cwd": os.getcwd()}\n'
             'try: os.listdir(sys.argv[1]); r["secret"] = "listed"\n'
             'except OSError as e: r["secret"] = type(e).__name__\n'
             'open(os.path.join(os.environ["HOME"], "probe.json"), "w").write(json.dumps(r))\n'
             'import time; time.sleep(60)\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "USER": "root"}
    reply = _ask(sock, {"op": "start", "user": name, "env": env,
                        "argv": ["/bin/sh", "-c", f"exec python3 -c '{probe}' {secret}"]})
    assert "pid" in reply, reply
    person = pwd.getpwnam(f"jupyter-{name}")
    out = Path(person.pw_dir) / "probe.json"
    deadline = time.monotonic() + 20
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    got = json.loads(out.read_text())
    assert got["uid"] == person.pw_uid != 0
    assert got["home"] == got["cwd"] == person.pw_dir  # not the hub's HOME
    assert Path(person.pw_dir).stat().st_mode & 0o777 == 0o700
    if mount_namespaces_work():
        assert got["secret"] == "PermissionError"
    # One server per person; signals reach only it.
    again = _ask(sock, {"op": "start", "user": name, "argv": ["/bin/sh"], "env": {}})
    assert "already running" in again["error"]
    assert _ask(sock, {"op": "signal", "user": name, "signal": 0}) == {"alive": True}
    assert _ask(sock, {"op": "signal", "user": "somebody", "signal": 0}) == {"alive": False}
    assert _ask(sock, {"op": "signal", "user": name,
                       "signal": int(signal.SIGKILL)}) == {"alive": True}
    deadline = time.monotonic() + 10
    while _ask(sock, {"op": "signal", "user": name, "signal": 0})["alive"]:
        assert time.monotonic() < deadline, "the server did not stop"
        time.sleep(0.05)
