"""The ethics board's own credential: requests signed with the board's Ed25519 key.

``bulle board … --key`` signs each request (``privacy.sign_board_request``: method, raw
path and query, body digest, nonce, two minutes of validity) and sends it as
``Authorization: Bulle-Board <token>``. The coordinator verifies it against
``board_public_key`` from its config — the key nodes already trust for grants — so the board
needs no hub login and no notebook server. The caller is ``board:<key id>`` with the
approve and audit scopes (never query or train). Every accepted request that changes
something is written to the coordinator's audit chain with its key id, nonce and body
digest. Each nonce is written to the coordinator's database (``bulle_board_nonces``,
migration 0005) until it expires, so a captured request is refused if replayed — after a
restart too, and at any other replica sharing the database.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, String, Table, delete, insert
from sqlalchemy.exc import IntegrityError

from federation._errors import QueryError
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller
from federation._registry import _engine, metadata

BOARD_SCOPES = frozenset({SCOPE_APPROVE, SCOPE_AUDIT})
_NONCE = re.compile(r"[0-9a-f]{16,64}")

nonces_table = Table(
    "bulle_board_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("expires", String(40), nullable=False),  # ISO 8601 UTC: sorts as time
)


class NonceStore:
    """Board request nonces seen and not yet expired, in the coordinator's database."""

    def __init__(self, url: str) -> None:
        self._engine = _engine(url if "://" in url else f"sqlite:///{url}")
        with self._engine.begin() as conn:
            metadata.create_all(conn, tables=[nonces_table])

    def first_use(self, nonce: str, expires: datetime, now: datetime) -> bool:
        """Record ``nonce``; False if it was already recorded (a replay)."""
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(nonces_table).where(nonces_table.c.expires < _iso(now)))
                conn.execute(insert(nonces_table).values(nonce=nonce, expires=_iso(expires)))
        except IntegrityError:
            return False
        return True

    def close(self) -> None:
        self._engine.dispose()


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def board_token(authorization: str | None) -> str | None:
    """The token of a ``Bulle-Board`` Authorization header, else None."""
    from privacy import BOARD_REQUEST_SCHEME

    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == BOARD_REQUEST_SCHEME.lower() else None


class BoardKeyAuth:
    """Verifies board-signed requests for one coordinator (its key, its audit chain)."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        path = coordinator.config.board_public_key
        self.public_key = path.read_bytes() if path is not None else None
        self._nonces = NonceStore(coordinator.config.database) if self.public_key else None

    def identify(self, token: str, method: str, target: str, body: bytes) -> Caller:
        from privacy import GrantError, verify_board_request

        if self.public_key is None:
            raise QueryError("unauthenticated", "this coordinator has no board_public_key: "
                             "board-signed requests are not accepted", status=401)
        now = datetime.now(UTC)
        try:
            req = verify_board_request(token, self.public_key, method, target, body, now)
        except GrantError as e:  # the reason helps the board; nothing here is secret
            raise QueryError("unauthenticated", f"board signature refused ({e})",
                             status=401) from None
        assert self._nonces is not None
        if not _NONCE.fullmatch(req.nonce):
            raise QueryError("unauthenticated", "board signature refused (malformed nonce)",
                             status=401)
        if not self._nonces.first_use(req.nonce, req.expires, now):
            raise QueryError("unauthenticated", "board request replayed (each signed "
                             "request is accepted once)", status=401)
        caller = Caller(f"board:{req.kid}", BOARD_SCOPES, "board-key")
        if method.upper() not in ("GET", "HEAD"):
            self.coordinator.projects.audit.append(
                caller.name, "", "board_signed_request",
                {"method": req.method, "target": req.target, "nonce": req.nonce,
                 "body_sha256": req.body_sha256})
        return caller

    async def from_request(self, request: Any, token: str) -> Caller:
        """Verify ``token`` against the request as received (raw path, query and body)."""
        from starlette.concurrency import run_in_threadpool

        target = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string") or b""
        if query:
            target += b"?" + query
        body = await request.body()  # cached: the route reads the same bytes
        return await run_in_threadpool(self.identify, token, request.method,
                                       target.decode("latin-1"), body)
