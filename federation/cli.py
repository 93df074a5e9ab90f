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
    parser = argparse.ArgumentParser(
        prog="bulle coordinator", epilog="every key of the --config file, its type, default "
        "and help: `bulle coordinator settings` (a commented example: `bulle coordinator "
        "settings --example`)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API in front of the nodes")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--log-level", default="info")
    nodes = sub.add_parser("nodes", help="the node registry: list, add or remove nodes of "
                           "the federation (a running coordinator follows within a second)")
    nodes.add_argument("action", choices=["list", "add", "remove"])
    nodes.add_argument("node", nargs="?", help="node id (the CN of its certificate)")
    nodes.add_argument("address", nargs="?", help="host:port of its agent (add)")
    nodes.add_argument("--config", required=True, type=Path)
    nodes.add_argument("--actor", default=None, help="who makes the change (audit; default: "
                       "the system user)")
    settings = sub.add_parser("settings", help="every config key with its type, default and "
                              "help (--example: a commented example config to start from)")
    settings.add_argument("--example", action="store_true")
    supernodes = sub.add_parser("supernodes", help="register the SuperNode keys of "
                                "[training] node_keys with the running SuperLink (before "
                                "those nodes start: an unknown key is refused)")
    supernodes.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv[1:])
    if args.cmd == "settings":  # derived from the declared settings (federation/_config.py)
        from federation._config import SCHEMA
        from federation._settings import example_toml, reference_text

        print((example_toml if args.example else reference_text)(SCHEMA), end="")
        return 0
    if args.cmd == "nodes":
        return _nodes(args)
    if args.cmd == "supernodes":
        return _supernodes(args.config)
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
    coordinator.indicators.start()  # refreshes standing indicators on their schedules
    host, port = config.host_port
    try:
        uvicorn.run(build_app(coordinator), host=host, port=port, log_level=args.log_level,
                    access_log=False)
    finally:
        coordinator.close()
    return 0


def _nodes(args: argparse.Namespace) -> int:
    """``bulle coordinator nodes list|add|remove``: the registry in the coordinator's
    database, each change in its audit chain."""
    import getpass

    from federation._noderegistry import NodeRegistry, NodeRegistryError
    from privacy import AuditLog

    try:
        config = load_coordinator_config(args.config)
    except ConfigError as e:
        print(f"bulle coordinator nodes: {e}", file=sys.stderr)
        return 2
    registry = NodeRegistry(config.database, config.nodes)
    try:
        if args.action == "list":
            for e in registry.entries():
                print(f"{e.id:<20} {e.address:<28} {e.status:<8} {e.source}"
                      + (f" ({e.changed_at}, {e.changed_by})" if e.changed_at else ""))
            return 0
        if not args.node or (args.action == "add") != bool(args.address):
            print(f"bulle coordinator nodes {args.action}: give "
                  f"{'NODE ADDRESS' if args.action == 'add' else 'NODE'}", file=sys.stderr)
            return 2
        actor = args.actor or getpass.getuser()
        try:
            entry = (registry.add(args.node, args.address, actor) if args.action == "add"
                     else registry.remove(args.node, actor))
        except NodeRegistryError as e:
            print(f"bulle coordinator nodes {args.action}: {e}", file=sys.stderr)
            return 2
        config.state.mkdir(parents=True, exist_ok=True)
        done = "added" if args.action == "add" else "removed"
        AuditLog(config.state / "audit.sqlite").append(
            actor, "", f"node_{done}", {"node": entry.id, "address": entry.address})
        print(f"node {entry.id} {done} ({entry.address}); a running coordinator takes it "
              "up within a second")
        return 0
    finally:
        registry.close()


def _supernodes(path: Path) -> int:
    """``bulle coordinator supernodes``: the training nodes' keys, registered (idempotent)
    through the SuperLink's fenced Control API."""
    from federation._superlink import control_client, control_token, register_nodes

    try:
        training = load_coordinator_config(path).training
    except ConfigError as e:
        print(f"bulle coordinator supernodes: {e}", file=sys.stderr)
        return 2
    if training is None:
        print(f"bulle coordinator supernodes: {path} has no [training]", file=sys.stderr)
        return 2
    client = control_client(training.superlink, training.root_certificates,
                            control_token(training.control_token_file))
    try:
        ids = register_nodes(client, training.node_keys)
    finally:
        client.close()
    for name, node_id in ids.items():
        print(f"{name:<20} SuperNode {node_id}")
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
