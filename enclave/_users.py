"""System users and file ownership for the demo run as root (issue 12, DESIGN.md
"Processes and users"): node agents as ``bulle-node``, the coordinator, its SuperLink and
the hub's proxy as ``bulle-coord``, each person's notebook as ``jupyter-<hub name>``
(The Littlest JupyterHub's convention, so that no hub name can be a system account).

Also: the processes a demo started, found again through ``/proc`` (``bulle demo down``
stops single-user servers and kernels that run under other users and sessions).
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

NODE_USER = "bulle-node"
COORD_USER = "bulle-coord"
PERSON_PREFIX = "jupyter-"
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # what useradd accepts, portable subset


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path


def is_root() -> bool:
    return os.geteuid() == 0


def _account(name: str) -> Account:
    p = pwd.getpwnam(name)
    return Account(p.pw_name, p.pw_uid, p.pw_gid, Path(p.pw_dir))


def _useradd(name: str, args: list[str]) -> Account:
    """``useradd`` unless the user exists (idempotent; another process may win the race)."""
    try:
        return _account(name)
    except KeyError:
        pass
    r = subprocess.run(["useradd", *args, name], capture_output=True, text=True)
    try:
        return _account(name)
    except KeyError:
        raise RuntimeError(f"could not create system user {name}: "
                           f"{(r.stderr or r.stdout).strip()}") from None


def ensure_service_user(name: str) -> Account:
    """A system account with no home and no login shell, in its own group."""
    return _useradd(name, ["--system", "--user-group", "--no-create-home",
                           "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                           "--comment", "Bulle service"])


def person_user(hub_name: str, prefix: str = PERSON_PREFIX) -> str:
    """The system account of a hub user (``jupyter-<name>``); refuses names useradd
    would not take rather than rewriting them (two hub names must not share one)."""
    name = f"{prefix}{hub_name}"
    if not _NAME.match(name):
        raise ValueError(f"hub user {hub_name!r} has no valid system account name")
    return name


def ensure_person_user(name: str, home: Path, comment: str) -> Account:
    """A login account (own group, home ``home`` created by the caller)."""
    return _useradd(name, ["--user-group", "--no-create-home", "--home-dir", str(home),
                           "--shell", "/bin/bash", "--comment", comment])


def own(path: Path, account: Account | None, mode: int, recursive: bool = False,
        file_mode: int = 0o600) -> None:
    """chown (``None``: root) and chmod ``path``; with ``recursive``, everything below too
    (directories ``mode``, files ``file_mode``). Symbolic links are never followed."""
    uid, gid = (account.uid, account.gid) if account else (0, 0)
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, mode)
    if not recursive:
        return
    for root, dirs, files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chown(p, uid, gid)
                os.chmod(p, mode)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chown(p, uid, gid)
                os.chmod(p, file_mode)


def closed_ancestor(path: Path) -> Path | None:
    """The first folder above ``path`` that other users cannot traverse, if any."""
    for parent in path.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def mount_namespaces_work() -> bool:
    """Whether this machine lets root give a process its own mount namespace (the hub
    hides the open-data source from notebooks with one)."""
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# -- processes ---------------------------------------------------------------------------
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
