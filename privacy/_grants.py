"""Ethics-board grants signed with Ed25519.

Token: ``base64url(canonical JSON payload) + "." + base64url(signature)`` (no padding).
The signature covers the exact payload bytes. The payload carries ``kid``, a fingerprint of
the signing public key, so a grant signed by another key is reported as such rather than
as a mere bad signature. Canonical JSON: sorted keys, no spaces, UTF-8; a payload that is
not byte-identical to its canonical re-encoding is refused.

A changed payload and a corrupted signature are cryptographically the same event (the
signature does not verify): both are reported as ``bad_signature``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

TOKEN_VERSION = 1
PRIVATE_KEY_FILE = "board_ed25519.pem"
PUBLIC_KEY_FILE = "board_ed25519.pub.pem"
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

PrivateKeyLike = Ed25519PrivateKey | bytes | str | os.PathLike[str]
PublicKeyLike = Ed25519PublicKey | bytes | str | os.PathLike[str]


class GrantError(Exception):
    """A grant was refused. ``code`` is one of: malformed, wrong_key, bad_signature,
    expired, not_yet_valid."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True)
class Grant:
    """What the board allows one project: who, on which datasets, how much, until when."""

    project: str
    researchers: tuple[str, ...]
    datasets: tuple[str, ...]
    epsilon: float
    delta: float
    expires: datetime
    purpose: str
    issued: datetime

    def __post_init__(self) -> None:
        for name in ("project", "purpose"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        for name in ("researchers", "datasets"):
            items = getattr(self, name)
            if not isinstance(items, tuple) or not items:
                raise ValueError(f"{name} must be a non-empty tuple")
            if not all(isinstance(x, str) and x for x in items):
                raise ValueError(f"{name} must hold non-empty strings")
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < math.inf):
            raise ValueError(f"epsilon must be positive and finite, got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 <= self.delta < 1):
            raise ValueError(f"delta must be in [0, 1), got {self.delta!r}")
        check_window(self.issued, self.expires)


def check_window(issued: object, expires: object) -> None:
    """A signed document's validity window: two timezone-aware datetimes, in order."""
    for name, t in (("expires", expires), ("issued", issued)):
        if not isinstance(t, datetime) or t.utcoffset() is None:
            raise ValueError(f"{name} must be a timezone-aware datetime")
    if expires <= issued:  # type: ignore[operator]
        raise ValueError("expires must be after issued")


# ------------------------------------------------------------------------------- keys


def generate_board_keys(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new key pair as PEM files; the private one is created with mode 0600.

    Refuses to overwrite existing files (a lost board key cannot be re-made).
    """
    return generate_signing_keys(Path(directory) / PRIVATE_KEY_FILE,
                                 Path(directory) / PUBLIC_KEY_FILE)


def generate_signing_keys(priv_path: Path, pub_path: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair at these paths (private 0600, created atomically); refuses
    to overwrite either file."""
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL + mode at creation: the private key is never readable by others, not even
    # briefly (a chmod after writing would leave a window).
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_pem)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub_pem)
    return priv_path, pub_path


def load_private_key(key: PrivateKeyLike) -> Ed25519PrivateKey:
    """Accept a key object, PEM bytes, or a path to a PEM file."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    return _private_from_pem(key if isinstance(key, bytes) else Path(key).read_bytes())


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """Accept a key object, PEM bytes, or a path to a PEM file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    return _public_from_pem(key if isinstance(key, bytes) else Path(key).read_bytes())


# Parsing a PEM costs ~0.1 ms, and a node signs (the coordinator verifies) a statement per
# plan with the same few keys: keep the parsed, immutable key objects by PEM.
@lru_cache(maxsize=64)
def _private_from_pem(pem: bytes) -> Ed25519PrivateKey:
    loaded = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return loaded


@lru_cache(maxsize=256)
def _public_from_pem(pem: bytes) -> Ed25519PublicKey:
    loaded = serialization.load_pem_public_key(pem)
    if not isinstance(loaded, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return loaded


def key_id(public_key: Ed25519PublicKey) -> str:
    """Fingerprint: first 16 hex digits of SHA-256 of the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ------------------------------------------------------------------------ sign / verify


def sign_grant(grant: Grant, private_key: PrivateKeyLike) -> str:
    """Compact signed token for ``grant``."""
    key = load_private_key(private_key)
    return sign_payload(_to_payload(grant, key_id(key.public_key())), key)


def sign_payload(data: dict[str, Any], private_key: PrivateKeyLike) -> str:
    """``base64url(canonical JSON) + "." + base64url(Ed25519 signature)``; ``data`` should
    carry ``kid`` (``key_id`` of the signing key) so that a verifier can tell a token of
    another key from a forged one."""
    key = load_private_key(private_key)
    payload = _canonical(data)
    return f"{_b64e(payload)}.{_b64e(key.sign(payload))}"


def verify_grant(
    token: str,
    public_key: PublicKeyLike,
    now: datetime | None = None,
) -> Grant:
    """The grant in ``token`` if it is well formed, signed by ``public_key`` and current.

    Raises ``GrantError`` (see its ``code``) otherwise. Order of checks: shape, key id,
    signature, payload fields, validity window; nothing of the payload is trusted before
    the signature is checked.
    """
    grant = _from_payload(open_payload(token, public_key, "grant"))
    t = now or datetime.now(UTC)
    if t.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if t >= grant.expires:
        raise GrantError("expired", f"grant expired at {grant.expires.isoformat()}")
    if t < grant.issued:
        raise GrantError("not_yet_valid", f"grant issued in the future ({grant.issued})")
    return grant


def open_payload(token: str, public_key: PublicKeyLike, what: str = "token") -> dict[str, Any]:
    """The payload of a token made by ``sign_payload``, once its shape, key id, signature
    and canonical form are checked (``GrantError`` otherwise: malformed, wrong_key,
    bad_signature). Nothing of the payload is trusted before the signature is checked."""
    key = load_public_key(public_key)
    if not isinstance(token, str) or token.count(".") != 1:
        raise GrantError("malformed", "token must be two base64url parts joined by '.'")
    p64, s64 = token.split(".")
    payload, sig = _b64d(p64, "payload"), _b64d(s64, "signature")
    if len(sig) != 64:
        raise GrantError("malformed", f"signature must be 64 bytes, got {len(sig)}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GrantError("malformed", f"payload is not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GrantError("malformed", "payload is not a JSON object")
    expected_kid = key_id(key)
    if data.get("kid") != expected_kid:
        raise GrantError(
            "wrong_key",
            f"{what} names signing key {data.get('kid')!r}, this node trusts {expected_kid!r}",
        )
    try:
        key.verify(sig, payload)
    except InvalidSignature:
        raise GrantError(
            "bad_signature", "signature does not verify: payload altered or signature corrupt"
        ) from None
    if _canonical(data) != payload:
        raise GrantError("malformed", "payload is not canonical JSON")
    return data


# ---------------------------------------------------------------------------- internals

_FIELDS = ("project", "researchers", "datasets", "epsilon", "delta", "expires", "purpose",
           "issued")  # fmt: skip


def _to_payload(g: Grant, kid: str) -> dict[str, Any]:
    return {
        "v": TOKEN_VERSION,
        "kid": kid,
        "project": g.project,
        "researchers": list(g.researchers),
        "datasets": list(g.datasets),
        "epsilon": float(g.epsilon),
        "delta": float(g.delta),
        "expires": _iso(g.expires),
        "purpose": g.purpose,
        "issued": _iso(g.issued),
    }


def _from_payload(d: dict[str, Any]) -> Grant:
    missing = [f for f in (*_FIELDS, "v") if f not in d]
    if missing:
        raise GrantError("malformed", f"payload lacks {', '.join(missing)}")
    if d["v"] != TOKEN_VERSION:
        raise GrantError("malformed", f"unsupported token version {d['v']!r}")
    extra = set(d) - {*_FIELDS, "v", "kid"}
    if extra:
        raise GrantError("malformed", f"unknown payload fields {sorted(extra)}")
    try:
        for f in ("researchers", "datasets"):
            if not isinstance(d[f], list):
                raise ValueError(f"{f} must be a list")
        for f in ("epsilon", "delta"):
            if isinstance(d[f], bool) or not isinstance(d[f], (int, float)):
                raise ValueError(f"{f} must be a number")
        return Grant(
            project=d["project"],
            researchers=tuple(d["researchers"]),
            datasets=tuple(d["datasets"]),
            epsilon=float(d["epsilon"]),
            delta=float(d["delta"]),
            expires=_parse_time(d["expires"]),
            purpose=d["purpose"],
            issued=_parse_time(d["issued"]),
        )
    except (TypeError, ValueError) as exc:
        raise GrantError("malformed", f"invalid payload field: {exc}") from None


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_time(s: Any) -> datetime:
    if not isinstance(s, str) or not s.endswith("Z"):
        raise ValueError(f"time must be an ISO 8601 UTC string ending in Z, got {s!r}")
    return datetime.fromisoformat(s[:-1] + "+00:00")


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def _b64d(s: str, what: str) -> bytes:
    if not s or not set(s) <= _B64URL:
        raise GrantError("malformed", f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        raise GrantError("malformed", f"{what} is not base64url") from None
