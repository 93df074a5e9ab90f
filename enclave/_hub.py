"""Pieces of ``jupyterhub_config.py`` that are code: the demo authenticator, its user file,
the roles and scopes. Loaded by the hub process only (nothing of ours imports it).

The demo authenticator checks per-user passwords against PBKDF2 hashes in a JSON file
written by ``bulle demo up`` (which prints the generated passwords once). Production uses
OIDC instead (see ``jupyterhub_config.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from jupyterhub.auth import Authenticator
from traitlets import Unicode

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
