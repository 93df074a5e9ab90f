"""The ethics board's own credential: requests signed with the board's Ed25519 key.

``bulle board … --key`` signs each request (``privacy.sign_board_request``: method, raw
path and query, body digest, nonce, two minutes of validity) and sends it as
``Authorization: Bulle-Board <token>``. The coordinator verifies it against
``board_public_key`` from its config — the key nodes already trust for grants — so the board
needs no hub login and no notebook server. The caller is ``board:<key id>`` with the
approve and audit scopes (never query or train). Every accepted request that changes
something is written to the coordinator's audit chain with its key id, nonce and body
digest; nonces are remembered until they expire, so a captured request is refused if
replayed. (A restart forgets them: a request captured in the two minutes before a restart
could be replayed once — over TLS, that needs the board's own machine.)
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from federation._errors import QueryError
from federation._hubauth import SCOPE_APPROVE, SCOPE_AUDIT, Caller

BOARD_SCOPES = frozenset({SCOPE_APPROVE, SCOPE_AUDIT})
_MAX_NONCES = 100_000


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
        self._seen: dict[str, datetime] = {}  # nonce → expiry
        self._lock = threading.Lock()

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
        with self._lock:
            if len(self._seen) > _MAX_NONCES:  # expired nonces are refused by their expiry
                self._seen = {n: t for n, t in self._seen.items() if t > now}
            if req.nonce in self._seen:
                raise QueryError("unauthenticated", "board request replayed (each signed "
                                 "request is accepted once)", status=401)
            self._seen[req.nonce] = req.expires
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
