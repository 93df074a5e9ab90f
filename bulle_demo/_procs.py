"""The demo's processes: started detached (each in its own session, its log in
``logs/``), recorded by PID in ``pids.json``, waited for, and stopped with everything
below them (single-user servers and kernels run under other users and sessions)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nodes import process_alive


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it is free (a restarted demo keeps its ports), else any."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Pids:
    """``pids.json``: name → PID of every process ``up`` started."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, int]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def write(self, pids: dict[str, int]) -> None:
        self.path.write_text(json.dumps(pids))

    def running(self) -> dict[str, int]:
        return {name: pid for name, pid in self.read().items() if process_alive(pid)}


def spawn(log: Path, cwd: Path, args: list[str], env: dict[str, str],
          module: str = "bulle_cli", user: tuple[int, int] | None = None) -> int:
    """Start ``python -m <module> <args>`` in its own session, output to ``log``; as
    ``user`` (uid, gid; no other groups, umask 077) when given."""
    kw = {"user": user[0], "group": user[1], "extra_groups": [], "umask": 0o077} \
        if user else {}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd, **kw)
    return proc.pid


def wait_ready(name: str, pid: int, log: Path, timeout: float,
               ready: Callable[[], bool]) -> None:
    """Until ``ready()``; the end of ``name``'s log if it dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{name} exited during start-up; end of its log:\n{tail}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} was not ready within {timeout:g} s")


def stop(pids: dict[str, int]) -> list[str]:
    """SIGTERM each process group, SIGKILL what is left after 15 s; then whatever ran
    below them (found before anything stopped) that the hub could not stop."""
    pids = {n: p for n, p in pids.items() if process_alive(p)}
    below = process_tree(list(pids.values()))
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            os.kill(pid, signal.SIGTERM)
        except PermissionError:
            raise SystemExit("bulle demo: the demo runs under other users; stop it as "
                             "the user who started it (root)") from None
    deadline = time.monotonic() + 15
    for pid in pids.values():
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid):
            os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5  # the hub stops its servers; what it could not:
    while still_running(below) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in still_running(below):
        os.kill(pid, signal.SIGKILL)
    return list(pids)


def stop_pid_file(path: Path) -> None:
    """The process a pid file names (the hub's proxy, if the hub died before stopping it)."""
    if path.exists():
        pid = int(path.read_text().strip() or 0)
        if pid and process_alive(pid):
            os.kill(pid, signal.SIGTERM)
        path.unlink(missing_ok=True)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], session
    [3], start time [19])."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _table() -> dict[int, list[str]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (fields := _stat(int(d))) is not None:
            out[int(d)] = fields
    return out


def process_tree(pids: list[int]) -> dict[int, str]:
    """``pids`` and every process below them, plus every process in the session of any of
    those (a kernel's own children), as PID → start time (so a reused PID is not
    mistaken for one of ours later)."""
    table = _table()
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = set(), [p for p in pids if p in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    sessions = {table[p][3] for p in found} - {"0", str(os.getsid(0))}
    found |= {p for p, fields in table.items() if fields[3] in sessions}
    return {p: table[p][19] for p in found}


def still_running(tree: dict[int, str]) -> list[int]:
    """The processes of ``tree`` that still run (same start time, not a zombie)."""
    out = []
    for pid, started in tree.items():
        fields = _stat(pid)
        if fields is not None and fields[19] == started and fields[0] != "Z":
            out.append(pid)
    return out
