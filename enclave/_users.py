"""System users and file ownership when the hub's side runs as root (issue 12, DESIGN.md
"Processes and users"): service accounts (the demo's ``bulle-node`` and ``bulle-coord``,
``bulle_demo``), each person's notebook as ``jupyter-<hub name>`` (The Littlest
JupyterHub's convention, so that no hub name can be a system account), made by the spawn
broker.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

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


def mount_namespaces_work() -> bool:
    """Whether this machine lets root give a process its own mount namespace (the hub
    hides the open-data source from notebooks with one)."""
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
