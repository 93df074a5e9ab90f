"""``bulle node …`` — serve a node agent, or check its config and data."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from nodes._config import ConfigError, load_node_config


def _setup_logging(level: str, log_dir: Path | None) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_dir / "audit.jsonl", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        audit = logging.getLogger("bulle.node.audit")
        audit.addHandler(handler)
        audit.propagate = False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bulle node")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="load the datasets, lock DuckDB, serve gRPC (mTLS)")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--listen", help="override the config's listen address (host:port)")
    serve.add_argument("--log-level", default="info")
    check = sub.add_parser("check", help="load the datasets and print the catalogue")
    check.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv[1:])
    try:
        config = load_node_config(args.config)
        if getattr(args, "listen", None):
            config = replace(config, listen=args.listen)
        if args.cmd == "check":
            return _check(config)
        _setup_logging(args.log_level, config.log_dir)
        return _serve(config)
    except ConfigError as e:
        print(f"bulle node: {e}", file=sys.stderr)
        return 2


def _check(config) -> int:
    from nodes._engine import NodeEngine

    engine = NodeEngine(config)
    for t in engine.catalog().tables:
        print(f"{t.name:<24} {t.tier:<11} {t.row_count_bucket:<9} {len(t.columns)} columns")
    return 0


def _serve(config) -> int:
    from nodes._engine import NodeEngine
    from nodes._service import build_server

    log = logging.getLogger("bulle.node")
    engine = NodeEngine(config)
    server, port = build_server(config, engine)
    log.info("node %s serving %d tables on %s (port %d, mutual TLS)", config.node_id,
             len(config.datasets), config.listen, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("node %s stopping", config.node_id)
    server.stop(grace=5).wait()
    engine.close()
    return 0
