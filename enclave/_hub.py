"""Pieces of ``jupyterhub_config.py`` that are code: the demo authenticator, its user file,
the roles and scopes, and the spawner of a hub run as root. Loaded by the hub process only
(nothing of ours imports it).

The demo authenticator checks per-user passwords against PBKDF2 hashes in a JSON file
written by ``bulle demo up`` (which prints the generated passwords once). Production uses
OIDC instead (see ``jupyterhub_config.py``).

``SystemUserSpawner``: each person's server runs as their own system user, created at their
first server start (The Littlest JupyterHub's UserCreatingSpawner; not
``LocalAuthenticator.create_system_users``, which creates every allowed user at hub start
and maps hub names one-to-one onto system accounts), in a mount namespace where the
holders' source folders are hidden.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import hmac
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyterhub.auth import Authenticator
from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from traitlets import List, Unicode

from enclave._users import PERSON_PREFIX, ensure_person_user, own, person_user

REPO = Path(__file__).resolve().parents[1]

SERVICE = "bulle"
CUSTOM_SCOPES = {
    "custom:bulle:query": "Browse the catalogue, run federated SQL, see own projects and budget",
    "custom:bulle:train": "Launch DP training runs on the federation",
    "custom:bulle:approve": "Approve, amend or refuse research projects (ethics board)",
    "custom:bulle:audit": "Read the audit chains, releases and privacy spend",
}
ACCESS = f"access:services!service={SERVICE}"
# Role → scopes. `admin` is JupyterHub's own admin role, plus these scopes (`bulle-admin`).
ROLE_SCOPES = {
    "researcher": ["custom:bulle:query", "custom:bulle:train", ACCESS],
    "ethics-board": ["custom:bulle:approve", "custom:bulle:audit", ACCESS],
    "node-operator": ["custom:bulle:audit", ACCESS],
    "admin": list(CUSTOM_SCOPES),
}
_ITERATIONS = 120_000


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _ITERATIONS)
    return f"pbkdf2_sha256${_ITERATIONS}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        algo, iterations, salt, digest = stored.split("$")
    except ValueError:
        return False
    if algo != "pbkdf2_sha256":
        return False
    got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
    return hmac.compare_digest(got.hex(), digest)


def write_users(path: Path, accounts: dict[str, str]) -> dict[str, str]:
    """Create the user file for ``accounts`` (name → role) with generated passwords.

    Returns the passwords (name → password) for printing once; only hashes are stored. An
    existing file is kept and ``{}`` returned.
    """
    if path.exists():
        return {}
    path.parent.mkdir(parents=True, exist_ok=True)
    passwords = {name: secrets.token_urlsafe(12) for name in accounts}
    users = {name: {"role": role, "password": hash_password(passwords[name])}
             for name, role in accounts.items()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"users": users}, f, indent=2)
    return passwords


def read_users(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())["users"]
    except FileNotFoundError:
        return {}


def roles_for(users: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``c.JupyterHub.load_roles`` for the users of the file."""
    out = []
    for role, scopes in ROLE_SCOPES.items():
        members = sorted(n for n, u in users.items() if u.get("role") == role)
        if role == "admin":
            # The hub's own admin role cannot be redefined: its members also get the role
            # `bulle-admin` with Bulle's scopes.
            out.append({"name": "admin", "users": members})
            role = "bulle-admin"
        out.append({"name": role, "description": f"Bulle {role}", "scopes": scopes,
                    "users": members})
    return out


class DemoAuthenticator(Authenticator):
    """Per-user passwords from a JSON file of PBKDF2 hashes (the demo's accounts)."""

    users_file = Unicode(help="JSON file written by `bulle demo up`").tag(config=True)

    async def authenticate(self, handler: Any, data: dict[str, str]) -> str | None:
        name = self.normalize_username(data.get("username", ""))
        entry = read_users(self.users_file).get(name)
        if entry is None or not check_password(data.get("password", ""), entry["password"]):
            return None
        return name


# -- homes and single-user servers -----------------------------------------------------------
def prepare_home(home: Path) -> None:
    """A home gets the example notebooks, and JupyterLab's news prompt answered "no" (the
    enclave has no internet); the user's own files are never overwritten."""
    target = home / "examples"
    if not target.exists():
        target.mkdir(parents=True)
        for nb in (REPO / "enclave" / "examples").glob("*.ipynb"):
            shutil.copy(nb, target / nb.name)
    news = (home / ".jupyter" / "lab" / "user-settings" / "@jupyterlab" /
            "apputils-extension" / "notification.jupyterlab-settings")
    if not news.exists():
        news.parent.mkdir(parents=True, exist_ok=True)
        news.write_text('{"fetchNews": "false", "checkForUpdates": false}\n')


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


class SystemUserSpawner(LocalProcessSpawner):
    """The server of hub user ``name`` runs as system user ``jupyter-<name>`` (created at
    the first start, home ``<homes>/jupyter-<name>``, mode 0700, seeded with the examples),
    with ``hidden_paths`` covered (``hide_paths``). Needs a hub run as root."""

    user_prefix = Unicode(PERSON_PREFIX, help="prefix of the system account names"
                          ).tag(config=True)
    homes = Unicode("/home", help="folder of the homes of new accounts").tag(config=True)
    hidden_paths = List(Unicode(), help="folders a notebook must not see (the data "
                        "holders' sources when they share the hub's host)").tag(config=True)

    @property
    def system_user(self) -> str:
        return person_user(self.user.name, self.user_prefix)

    def _ensure_account(self) -> None:
        account = ensure_person_user(self.system_user, Path(self.homes) / self.system_user,
                                     f"Bulle hub user {self.user.name}")
        home = account.home
        if not home.exists():  # new home: filled as root, then handed over
            home.mkdir(mode=0o700, parents=True)
            prepare_home(home)
            own(home, account, 0o700, recursive=True, file_mode=0o644)

    async def start(self) -> Any:
        await asyncio.to_thread(self._ensure_account)
        return await super().start()

    def make_preexec_fn(self, name: str) -> Callable[[], None]:
        hide = hide_paths(list(self.hidden_paths))
        become = set_user_setuid(self.system_user)

        def preexec() -> None:
            hide()  # as root, before the uid changes
            become()

        return preexec

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        import pwd

        entry = pwd.getpwnam(self.system_user)
        env.update(USER=entry.pw_name, HOME=entry.pw_dir, SHELL=entry.pw_shell)
        return env
