"""Board requests signed with the board's own Ed25519 key (``bulle board … --key``).

The ethics board can act from the command line without a hub account: each HTTP request
carries ``Authorization: Bulle-Board <token>``, a token in the grants' format
(``_grants.sign_payload``) whose payload binds this one request::

    {typ: "bulle-board-request", v, kid, method, target, body_sha256, nonce, issued, expires}

``target`` is the raw path and query as sent; ``body_sha256`` the SHA-256 of the exact body
bytes. The verifier (the coordinator) checks the signature against the board's public key
from its config, the method, target and body of the request it received, and a short
validity window; it remembers nonces until they expire so that a captured request cannot
be replayed. A token signs one request: nothing else can be made of it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from privacy._grants import (
    GrantError,
    PrivateKeyLike,
    PublicKeyLike,
    _iso,
    _parse_time,
    key_id,
    load_private_key,
    open_payload,
    sign_payload,
)

TYPE = "bulle-board-request"
VERSION = 1
SCHEME = "Bulle-Board"  # the Authorization scheme
MAX_TTL_S = 300.0  # the longest validity a verifier accepts
CLOCK_SKEW_S = 60.0  # a board laptop's clock may run this much ahead
_FIELDS = {"typ", "v", "kid", "method", "target", "body_sha256", "nonce", "issued",
           "expires"}


@dataclass(frozen=True)
class BoardRequest:
    """A verified board request: which key signed it, and its nonce (for replay checks)."""

    kid: str
    method: str
    target: str
    nonce: str
    expires: datetime
    body_sha256: str


def sign_board_request(private_key: PrivateKeyLike, method: str, target: str, body: bytes,
                       now: datetime | None = None, ttl_s: float = 120.0) -> str:
    """The ``Bulle-Board`` token for one request (method, raw path and query, body)."""
    key = load_private_key(private_key)
    t = (now or datetime.now(UTC)).replace(microsecond=0)
    return sign_payload({
        "typ": TYPE, "v": VERSION, "kid": key_id(key.public_key()), "method": method.upper(),
        "target": target, "body_sha256": hashlib.sha256(body).hexdigest(),
        "nonce": secrets.token_hex(16), "issued": _iso(t),
        "expires": _iso(t + timedelta(seconds=min(ttl_s, MAX_TTL_S)))}, key)


def verify_board_request(token: str, public_key: PublicKeyLike, method: str, target: str,
                         body: bytes, now: datetime | None = None) -> BoardRequest:
    """The request if ``token`` was signed by the board for exactly this request and is
    current; ``GrantError`` otherwise (codes: malformed, wrong_key, bad_signature, expired,
    not_yet_valid, wrong_request)."""
    data: dict[str, Any] = open_payload(token, public_key, "board request")
    if set(data) != _FIELDS or data["typ"] != TYPE or data["v"] != VERSION:
        raise GrantError("malformed", "not a board request token")
    try:
        issued, expires = _parse_time(data["issued"]), _parse_time(data["expires"])
    except ValueError as e:
        raise GrantError("malformed", str(e)) from None
    t = now or datetime.now(UTC)
    if expires - issued > timedelta(seconds=MAX_TTL_S):
        raise GrantError("malformed", f"a board request is valid {MAX_TTL_S:g} s at most")
    if t >= expires:
        raise GrantError("expired", "board request expired (sign a new one; check the clock)")
    if t + timedelta(seconds=CLOCK_SKEW_S) < issued:
        raise GrantError("not_yet_valid", "board request issued in the future (clock?)")
    if (data["method"], data["target"]) != (method.upper(), target) \
            or data["body_sha256"] != hashlib.sha256(body).hexdigest():
        raise GrantError("wrong_request", "the token was signed for another request")
    return BoardRequest(str(data["kid"]), data["method"], data["target"], str(data["nonce"]),
                        expires, data["body_sha256"])
