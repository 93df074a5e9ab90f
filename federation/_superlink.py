"""The coordinator's Flower SuperLink: started fenced, nodes registered by their keys.

flwr 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS port, and the
open-source Control API has no authentication (TRAPS.md): whoever reaches it can start
runs (i.e. run code on the SuperLink host) and register nodes. ``bulle coordinator
superlink`` starts the stock SuperLink (TLS, ``--enable-supernode-auth``,
``--disable-runtime-dependency-installation``) behind an ASGI fence:

- ``/v1/fleet/*`` and ``/health``: open (TLS; every SuperNode signs with a registered key);
- ``/v1/control/*``: only from the loopback *and* with the coordinator's secret header
  (``x-bulle-control-token``, a 0600 file in the coordinator's state);
- ``/v1/runtime/*``: only from the loopback *and* with the runtime secret
  (``x-bulle-runtime-token``): a random secret this process draws at start, keeps in
  memory and hands, in the environment, to the SuperExec it spawns and through it to the
  ServerApp processes; both send it on every Runtime API call (``bulle_flower/_fence.py``).
  They are started through two shims (``<state>/bin/flower-superexec``,
  ``flwr-serverapp``, first on the ``PATH`` the SuperLink spawns with). Another process on
  the host can neither take a pending ServerApp task (``AcquireTask``) nor use a run token
  it read from a command line;
- anything else (``/docs``…): 404.

In Kubernetes the same split is done by the nginx sidecar (deploy/k8s/manifests/
superlink.yaml). The fence wraps the app returned by ``flwr.superlink.main.create_app``
(a public function the SuperLink CLI looks up at start-up).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

from bulle_flower import (
    ASGI,
    SUPERLINK_SECRET_ENV,
    Scope,
    deny,
    loopback_with_secret,
    new_secret,
    send_secret_on_runtime_calls,
)

CONTROL_HEADER = "x-bulle-control-token"
# Flower commands the SuperLink (and its SuperExec) start by name: our shims go first.
CHILDREN = {"flower-superexec": ("flwr.supercore.cli", "flower_superexec"),
            "flwr-serverapp": ("flwr.superlink.cli", "flwr_serverapp")}


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

    def __init__(self, app: ASGI, token: str, runtime_secret: str) -> None:
        self.app = app
        self.token = token.encode()
        self.runtime_secret = runtime_secret.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        if path.startswith("/v1/fleet/") or path == "/health":
            allowed = True
        elif path.startswith("/v1/control/"):
            allowed = loopback_with_secret(scope, self.token, CONTROL_HEADER)
        elif path.startswith("/v1/runtime/"):
            allowed = loopback_with_secret(scope, self.runtime_secret)
        else:
            allowed = False
        if allowed:
            return await self.app(scope, receive, send)
        await deny(send, 403 if path.startswith(("/v1/control/", "/v1/runtime/")) else 404)


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
    runtime_secret = new_secret()  # in memory; only the processes spawned for it get it
    os.environ[SUPERLINK_SECRET_ENV] = runtime_secret
    os.environ["FLWR_HOME"] = str(args.state / "flwr")
    # The SuperExec it spawns polls for ServerApp tasks: the only supported knob (TRAPS.md).
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2.0")  # ≤ 2 s, once per run
    bindir = str(Path(sys.executable).parent)  # flower-superexec / flwr-serverapp live here
    os.environ["PATH"] = os.pathsep.join([str(write_shims(args.state / "bin")), bindir,
                                          os.environ.get("PATH", "")])

    import flwr.superlink.main as superlink_main
    from flwr.supercore.logger import update_console_handler
    from flwr.superlink.cli import flower_superlink

    update_console_handler(timestamps=True, colored=False)

    create_app = superlink_main.create_app

    def fenced_create_app(*a: Any, **kw: Any) -> Any:
        app = create_app(*a, **kw)
        # outermost: runs before Flower's own
        app.add_middleware(Fence, token=token, runtime_secret=runtime_secret)
        return app

    superlink_main.create_app = fenced_create_app  # type: ignore[assignment]
    sys.argv = ["flower-superlink", "--ssl-ca-certfile", str(args.ca),
                "--ssl-certfile", str(args.cert), "--ssl-keyfile", str(args.key),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--database", str(args.database),
                "--host", args.host, "--port", str(args.port)]
    flower_superlink()
    return 0


def write_shims(bindir: Path) -> Path:
    """``flower-superexec`` and ``flwr-serverapp`` that run Flower's own entry points in a
    process that sends the runtime secret (``python -m federation._superlink child …``)."""
    bindir.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    for name in CHILDREN:
        path = bindir / name
        tmp = bindir / f".{name}.tmp"
        tmp.write_text(f'#!/bin/sh\nexec {python} -m federation._superlink child {name} "$@"\n')
        tmp.chmod(0o700)
        os.replace(tmp, path)
    return bindir


def child(argv: list[str]) -> int:
    """A Flower process started by the SuperLink (or by its SuperExec) for the Runtime API:
    its clients send the secret; a ServerApp does not pass the secret on further."""
    import importlib

    name, rest = argv[0], argv[1:]
    module, function = CHILDREN[name]
    secret = os.environ.get(SUPERLINK_SECRET_ENV, "")
    if not secret:
        raise SystemExit(f"{name}: not started by a fenced SuperLink (no runtime secret)")
    if name == "flwr-serverapp":  # runs app code: the SuperExec alone passes it on
        del os.environ[SUPERLINK_SECRET_ENV]
    send_secret_on_runtime_calls(secret)
    sys.argv = [name, *rest]
    getattr(importlib.import_module(module), function)()
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


if __name__ == "__main__":  # the shims: python -m federation._superlink child <name> …
    if len(sys.argv) < 3 or sys.argv[1] != "child" or sys.argv[2] not in CHILDREN:
        raise SystemExit("usage: python -m federation._superlink child "
                         f"{{{','.join(CHILDREN)}}} ARGS…")
    sys.exit(child(sys.argv[2:]))
