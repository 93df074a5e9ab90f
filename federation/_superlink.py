"""The coordinator's Flower SuperLink: started fenced, nodes registered by their keys.

flwr 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS port, and the
open-source Control API has no authentication (TRAPS.md): whoever reaches it can start
runs (i.e. run code on the SuperLink host) and register nodes. ``bulle coordinator
superlink`` starts the stock SuperLink (TLS, ``--enable-supernode-auth``,
``--disable-runtime-dependency-installation``) behind an ASGI fence:

- ``/v1/fleet/*`` and ``/health``: open (TLS; every SuperNode signs with a registered key);
- ``/v1/control/*``: only from the loopback *and* with the coordinator's secret header
  (``x-bulle-control-token``, a 0600 file in the coordinator's state);
- ``/v1/runtime/*``: only from the loopback (the ServerApp and SuperExec it spawns);
- anything else (``/docs``…): 404.

In Kubernetes the same split is done by the nginx sidecar (deploy/k8s/manifests/
superlink.yaml). The fence wraps the app returned by ``flwr.superlink.main.create_app``
(a public function the SuperLink CLI looks up at start-up).
"""

from __future__ import annotations

import argparse
import hmac
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

CONTROL_HEADER = "x-bulle-control-token"
LOOPBACK = ("127.0.0.1", "::1")
Scope = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                Awaitable[None]]


def control_token(path: Path) -> str:
    """The Control API secret (created 0600 on first use)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


class Fence:
    """ASGI middleware in front of the SuperLink's FastAPI app (see the module docstring)."""

    def __init__(self, app: ASGI, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        client = scope.get("client") or ("", 0)
        local = client[0] in LOOPBACK
        if path.startswith("/v1/fleet/") or path == "/health":
            allowed = True
        elif path.startswith("/v1/control/"):
            given = dict(scope.get("headers") or []).get(CONTROL_HEADER.encode(), b"")
            allowed = local and hmac.compare_digest(given, self.token)
        elif path.startswith("/v1/runtime/"):
            allowed = local
        else:
            allowed = False
        if allowed:
            return await self.app(scope, receive, send)
        status = 403 if path.startswith(("/v1/control/", "/v1/runtime/")) else 404
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"not here\n"})


def serve(argv: list[str]) -> int:
    """``bulle coordinator superlink``: the stock SuperLink CLI, fenced."""
    parser = argparse.ArgumentParser(prog="bulle coordinator superlink")
    parser.add_argument("--state", required=True, type=Path, help="SuperLink state folder")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cert", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    parser.add_argument("--ca", required=True, type=Path)
    parser.add_argument("--control-token-file", required=True, type=Path)
    parser.add_argument("--database", default=":flwr-in-memory:",
                        help="LinkState database (default: in memory — an SQLite file costs "
                        "a commit per message object, seconds per round; node keys are "
                        "registered again by the coordinator after a restart)")
    args = parser.parse_args(argv)
    args.state.mkdir(parents=True, exist_ok=True)
    token = control_token(args.control_token_file)
    os.environ["FLWR_HOME"] = str(args.state / "flwr")
    # The SuperExec it spawns polls for ServerApp tasks: the only supported knob (TRAPS.md).
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    bindir = str(Path(sys.executable).parent)  # flower-superexec / flwr-serverapp live here
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    import flwr.superlink.main as superlink_main
    from flwr.supercore.logger import update_console_handler
    from flwr.superlink.cli import flower_superlink

    update_console_handler(timestamps=True, colored=False)

    create_app = superlink_main.create_app

    def fenced_create_app(*a: Any, **kw: Any) -> Any:
        app = create_app(*a, **kw)
        app.add_middleware(Fence, token=token)  # outermost: runs before Flower's own
        return app

    superlink_main.create_app = fenced_create_app  # type: ignore[assignment]
    sys.argv = ["flower-superlink", "--ssl-ca-certfile", str(args.ca),
                "--ssl-certfile", str(args.cert), "--ssl-keyfile", str(args.key),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--database", str(args.database),
                "--host", args.host, "--port", str(args.port)]
    flower_superlink()
    return 0


# ---------------------------------------------------------------------------- the client


class _TokenInterceptor:
    def __init__(self, token: str) -> None:
        self.token = token

    def intercept(self, context: Any, call_next: Any) -> Any:
        context.request.headers[CONTROL_HEADER] = self.token
        return call_next(context)


def control_client(address: str, ca: Path, token: str) -> Any:
    """A Control API client (protobuf over HTTPS) carrying the fence's secret."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        server_address=address, insecure=False, root_certificates=ca.read_bytes(),
        interceptors=[_TokenInterceptor(token),
                      RuntimeVersionHttpInterceptor(component_name="flwr CLI")])


def register_nodes(client: Any, public_keys: dict[str, Path]) -> dict[str, int]:
    """Register each node's SuperNode key (idempotent); returns node name → Flower id."""
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    known = {bytes(n.public_key): n for n in client.ListNodes(ListNodesRequest()).nodes_info
             if not n.unregistered_at}
    out = {}
    for name, path in sorted(public_keys.items()):
        key = public_key_to_bytes(serialization.load_ssh_public_key(path.read_bytes()))
        if key in known:
            out[name] = int(known[key].node_id)
            continue
        res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
        out[name] = int(res.node_id)
    return out
