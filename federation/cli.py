"""``bulle coordinator …`` and ``bulle certs``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from federation._config import ConfigError, load_coordinator_config


def main(argv: list[str]) -> int:
    if argv[0] == "certs":
        return _certs(argv[1:])
    if argv[1:2] == ["superlink"]:  # the Flower SuperLink for DP training, fenced
        from federation._superlink import serve as serve_superlink

        return serve_superlink(argv[2:])
    parser = argparse.ArgumentParser(prog="bulle coordinator")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API in front of the nodes")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--log-level", default="info")
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_coordinator_config(args.config)
    except ConfigError as e:
        print(f"bulle coordinator: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from federation._api import build_app
    from federation._coordinator import Coordinator

    coordinator = Coordinator(config)
    host, port = config.host_port
    try:
        uvicorn.run(build_app(coordinator), host=host, port=port, log_level=args.log_level,
                    access_log=False)
    finally:
        coordinator.close()
    return 0


def _certs(argv: list[str]) -> int:
    from federation._certs import make_certs

    if argv[:1] == ["sign"]:
        return _sign(argv[1:])
    parser = argparse.ArgumentParser(prog="bulle certs",
                                     description="create a local CA, node and coordinator certs")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--node", action="append", default=[], help="node id (repeatable)")
    parser.add_argument("--host", action="append", default=[],
                        help="DNS name or IP for the certificates (default localhost, 127.0.0.1)")
    args = parser.parse_args(argv)
    out = make_certs(args.out, args.node, args.host or None)
    print(f"certificates in {out}")
    return 0


def _sign(argv: list[str]) -> int:
    from federation._certs import SigningRefused, sign_request

    parser = argparse.ArgumentParser(
        prog="bulle certs sign",
        description="sign a node's certificate request (from bulle node keygen) with the CA")
    parser.add_argument("--ca", required=True, type=Path, help="folder with ca.pem and ca.key")
    parser.add_argument("--csr", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="the certificate to write")
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)
    try:
        pem = sign_request(args.csr.read_bytes(), args.ca, args.days)
    except (SigningRefused, OSError) as e:
        print(f"bulle certs sign: refused: {e}", file=sys.stderr)
        return 2
    args.out.write_bytes(pem)
    print(f"certificate in {args.out}: return it to the node (with {args.ca / 'ca.pem'})")
    return 0
