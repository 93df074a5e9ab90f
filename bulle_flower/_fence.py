"""Flower's local APIs, reachable only by their own processes.

flwr 1.42 serves a Runtime API next to each SuperLink (``/v1/runtime/*`` on its one port:
the SuperExec takes ServerApp tasks there, the ServerApp pushes and pulls messages) and
next to each SuperNode (its "app I/O": the executor takes ClientApp tasks there). Both
answer any loopback client, and ``AcquireTask`` hands a pending task and its run token to
whoever asks first. So each is fenced by a secret the process that starts it draws at
random, holds in memory and gives, in the environment (readable only by the same user),
to the processes it starts for that API alone:

- every request to a fenced path must come from the loopback and carry the secret in
  ``x-bulle-runtime-token`` (compared in constant time), or it gets 403;
- the processes holding the secret send it on every Runtime API call: our executor through
  its client's interceptors (``SecretHeader``); Flower's own SuperExec and ServerApp
  processes through ``send_secret_on_runtime_calls`` (their clients are built by flwr).

A run token that leaks through a command line (flwr passes it as ``--token``) is therefore
useless to any other process: it lacks the secret.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

RUNTIME_HEADER = "x-bulle-runtime-token"
SUPERLINK_SECRET_ENV = "BULLE_SUPERLINK_RUNTIME_SECRET"  # SuperLink → SuperExec → ServerApp
APPIO_SECRET_ENV = "BULLE_SUPERNODE_APPIO_SECRET"  # node agent → SuperNode and executor
LOOPBACK = ("127.0.0.1", "::1")
Scope = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                Awaitable[None]]


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def take_secret(env: str) -> str:
    """The secret this process was given, removed from its environment (so that what it
    starts later does not inherit it unless it is passed on on purpose)."""
    value = os.environ.pop(env, "")
    if not value:
        raise RuntimeError(f"{env} is not set: this process was not started by its owner")
    return value


def header(scope: Scope, name: str) -> bytes:
    for key, value in scope.get("headers") or []:
        if key == name.encode():
            return bytes(value)
    return b""


def loopback_with_secret(scope: Scope, secret: bytes, name: str = RUNTIME_HEADER) -> bool:
    client = scope.get("client") or ("", 0)
    return client[0] in LOOPBACK and hmac.compare_digest(header(scope, name), secret)


async def deny(send: Any, status: int) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"not here\n"})


class AppIoFence:
    """ASGI middleware in front of a SuperNode's local API: ``/health`` is open, anything
    else only for loopback clients that carry the secret."""

    def __init__(self, app: ASGI, secret: str) -> None:
        self.app = app
        self.secret = secret.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health" \
                or loopback_with_secret(scope, self.secret):
            return await self.app(scope, receive, send)
        await deny(send, 403)


class SecretHeader:
    """Client interceptor (flwr's protobuf-over-HTTP clients): sends the secret."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def intercept(self, context: Any, call_next: Any) -> Any:
        context.request.headers[RUNTIME_HEADER] = self.secret
        return call_next(context)


def send_secret_on_runtime_calls(secret: str) -> None:
    """Every protobuf-over-HTTP client this process builds (flwr's SuperExec, ServerApp
    grid, heartbeats) sends the secret. Patches ``ProtobufClient.__init__`` (flwr 1.42.0
    pinned; ``tests/test_training.py`` fails if its ``interceptors`` keyword goes away)."""
    from bulle_flower._patches import _check_version

    _check_version()
    from flwr.supercore.protobuf.client import ProtobufClient

    init = ProtobufClient.__init__
    if getattr(init, "_bulle_secret", False):
        return
    tag = SecretHeader(secret)

    def with_secret(self: Any, base_url: str, *, interceptors: Any = (), **kw: Any) -> None:
        init(self, base_url, interceptors=(*interceptors, tag), **kw)

    with_secret._bulle_secret = True  # type: ignore[attr-defined]
    ProtobufClient.__init__ = with_secret  # type: ignore[method-assign]
