"""Pieces of ``jupyterhub_config.py`` that are code: the demo authenticator, its user file,
the roles and scopes, and the hub's side of the spawn broker. Loaded by the hub process
(and the broker).

The demo authenticator checks per-user passwords against PBKDF2 hashes in a JSON file
written by ``bulle demo up`` (which prints the generated passwords once). Production uses
OIDC instead (see ``jupyterhub_config.py``).

``BrokeredSpawner``: the hub runs as a service user, never root; each person's server runs
as their own system user, created at their first server start (The Littlest JupyterHub's
UserCreatingSpawner; not ``LocalAuthenticator.create_system_users``, which creates every
allowed user at hub start and maps hub names one-to-one onto system accounts), in a mount
namespace where the holders' source folders are hidden. Both are the root spawn broker's
work (``enclave/_spawnbroker.py``), asked over a socket only the hub's user can use.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from jupyterhub.auth import Authenticator
from jupyterhub.spawner import LocalProcessSpawner
from jupyterhub.utils import random_port
from traitlets import Unicode

REPO = Path(__file__).resolve().parents[1]

SERVICE = "bulle"
CUSTOM_SCOPES = {
    "custom:bulle:query": "Browse the catalogue, run federated SQL, see own projects and budget",
    "custom:bulle:train": "Launch DP training runs on the federation",
    "custom:bulle:approve": "Approve, amend or refuse research projects (ethics board)",
    "custom:bulle:audit": "Read the audit chains, releases and privacy spend",
    "custom:bulle:observe": "Read the standing indicators (State and local-authority staff)",
    "custom:bulle:metrics": "Scrape the coordinator's Prometheus metrics (monitoring only)",
}
ACCESS = f"access:services!service={SERVICE}"
# Role → scopes. `admin` is JupyterHub's own admin role, plus these scopes (`bulle-admin`).
ROLE_SCOPES = {
    "researcher": ["custom:bulle:query", "custom:bulle:train", ACCESS],
    "ethics-board": ["custom:bulle:approve", "custom:bulle:audit", ACCESS],
    "node-operator": ["custom:bulle:audit", ACCESS],
    # State and local-authority staff: the indicators' pages, no query rights, no server
    "observer": ["custom:bulle:observe", ACCESS],
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


# Where each role lands after login: only researchers use a notebook server, so only they
# get one started; the board lands on the Bulle home (its links: the board, the node pages,
# the catalogue), operators on the node pages (which send them on to their own node),
# observers on the standing indicators, admins on the hub's admin.
HOME = f"services/{SERVICE}/"
LANDING = (("researcher", None), ("ethics-board", HOME), ("node-operator", HOME + "operator/"),
           ("observer", f"services/{SERVICE}/indicators/"), ("admin", "hub/admin"))
TEMPLATES = REPO / "enclave" / "hub_templates"  # the hub's pages link to the Bulle home
# The JupyterLab launcher's "Bulle" card (jupyter-app-launcher's YAML), beside this module
# so that an installed package (the notebook image) has it too.
LAUNCHER = Path(__file__).resolve().parent / "launcher"


def landing_url(handler: Any) -> str:
    """``c.JupyterHub.default_url``: the page a person arrives on, by role."""
    from jupyterhub.utils import url_path_join

    user = handler.current_user
    roles = {r.name for r in user.roles} if user is not None else set()
    for role, page in LANDING:
        if role in roles:
            if page is not None:
                return url_path_join(handler.base_url, page)
            # a researcher: their server, started first if it is not running (the server's
            # own URL would answer 424 "not running" instead of starting it)
            return user.url if user.running else url_path_join(handler.base_url, "hub/spawn")
    return url_path_join(handler.base_url, "hub/home")


# Roles that hold no query rights, so no use for a notebook: no server is started for them,
# even when asked for directly (``POST /hub/api/users/<name>/server``, ``/hub/spawn``).
NO_SERVER_ROLES = frozenset({"observer"})


def refuse_server(spawner: Any) -> None:
    """``Spawner.pre_spawn_hook``: an observer (with no researcher or admin role) gets no
    single-user server."""
    from tornado import web

    roles = {r.name for r in spawner.user.roles}
    if roles & NO_SERVER_ROLES and not roles & {"researcher", "admin"}:
        raise web.HTTPError(403, "observers read the standing indicators "
                            f"(/services/{SERVICE}/indicators/) and have no notebook server")


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


class BrokeredSpawner(LocalProcessSpawner):
    """The server of hub user ``name`` runs as system user ``jupyter-<name>``, started by
    the root spawn broker (``enclave/_spawnbroker.py``) this hub, run as a service user,
    reaches on ``socket``. Only the start and the signals go through the broker; ports,
    arguments and the environment are JupyterHub's own (LocalProcessSpawner's)."""

    socket = Unicode(help="the spawn broker's Unix socket").tag(config=True)

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(self.socket)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            reply = json.loads(await reader.readline() or b"{}")
        finally:
            writer.close()
        if "error" in reply or not reply:
            raise RuntimeError(f"spawn broker: {reply.get('error', 'no answer')}")
        return reply

    async def start(self) -> Any:
        if self.port == 0:
            self.port = random_port()
        argv = [*self.cmd, *self.get_args()]
        reply = await self._ask({"op": "start", "user": self.user.name, "argv": argv,
                                 "env": self.get_env()})
        self.pid = reply["pid"]
        return (self.ip or "127.0.0.1", self.port)

    async def _signal(self, sig: int) -> bool:
        reply = await self._ask({"op": "signal", "user": self.user.name, "signal": int(sig)})
        return bool(reply["alive"])

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        return env  # USER, HOME and SHELL are the account's, set by the broker
