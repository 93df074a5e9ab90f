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


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _keygen(node_id: str, hosts: list[str], out: Path, state: Path | None) -> int:
    from nodes._keygen import make_node_keys

    made = make_node_keys(node_id, hosts, out, state)
    print(f"TLS key        {made['key']} (stays here)\n"
          f"request        {made['csr']} (send it to the federation's admin: "
          "bulle certs sign)\n"
          f"SuperNode key  {made['supernode_key']} (stays here)\n"
          f"public key     {made['supernode_public_key']} (send it too: [training] node_keys)")
    if "receipt_key" in made:
        print(f"receipt key    {made['receipt_key']} (stays here: signs what this node "
              f"releases)\npublic key     {made['receipt_public_key']} (published in the "
              "catalogue and the coordinator's /v1/keys)")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bulle node", epilog="every key of the --config file, its type, default and help: "
        "`bulle node settings` (a commented example: `bulle node settings --example`)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="load the datasets, lock DuckDB, serve gRPC (mTLS)")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--listen", help="override the config's listen address (host:port)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--superlink", help="override [training] superlink (host:port)")
    check = sub.add_parser("check", help="load the datasets and print the catalogue")
    check.add_argument("--config", required=True, type=Path)
    ingest = sub.add_parser("ingest", help="pseudonymise, validate and write the datasets' "
                            "Parquet and quality reports (see nodes/_onboard/)")
    ingest.add_argument("--config", required=True, type=Path)
    ingest.add_argument("--dataset", metavar="TABLE", help="only this dataset")
    ingest.add_argument("--force", action="store_true", help="even if the inputs are unchanged")
    doctor = sub.add_parser("doctor", help="check config, data, TLS files, keys and port "
                                           "before serving (one ✔/✘ line per check)")
    doctor.add_argument("--config", required=True, type=Path)
    doctor.add_argument("--coordinator-ca", type=Path,
                        help="CA bundle the coordinator trusts (default: the node's client_ca)")
    doctor.add_argument("--host", help="name the coordinator dials, for the certificate check "
                                       "(default: the listen host)")
    doctor.add_argument("--superlink", help="check this SuperLink address instead of "
                                            "[training] superlink (as serve --superlink)")
    doctor.add_argument("--listen", help="check this address instead of the config's "
                                         "(as serve --listen)")
    keygen = sub.add_parser("keygen", help="make this node's TLS key and certificate request, "
                                           "and its SuperNode key for training")
    keygen.add_argument("--node-id", required=True)
    keygen.add_argument("--host", action="append", default=[], required=True,
                        help="DNS name or IP the coordinator dials (repeatable)")
    keygen.add_argument("--out", required=True, type=Path)
    keygen.add_argument("--state", type=Path, help="the node's state folder (its config's "
                        "state_dir): also make the receipt key there")
    settings = sub.add_parser("settings", help="every config key with its type, default and "
                              "help (--example: a commented example config to start from)")
    settings.add_argument("--example", action="store_true")
    args = parser.parse_args(argv[1:])
    if args.cmd == "settings":  # derived from the declared settings (nodes/_config.py)
        from federation import example_toml, reference_text
        from nodes._config import SCHEMA

        print((example_toml if args.example else reference_text)(SCHEMA), end="")
        return 0
    if args.cmd == "keygen":
        return _keygen(args.node_id, args.host, args.out, args.state)
    if args.cmd == "doctor":  # a config that does not parse is one of its checks
        from nodes._doctor import doctor as run_doctor

        return run_doctor(args.config, args.coordinator_ca, args.host, args.listen,
                          superlink=args.superlink)
    try:
        config = load_node_config(args.config)
        if getattr(args, "listen", None):
            config = replace(config, listen=args.listen)
        if args.cmd == "check":
            return _check(config)
        if args.cmd == "ingest":
            return _ingest(config, args.dataset, args.force)
        _setup_logging(args.log_level)
        return _serve(config, getattr(args, "superlink", None))
    except ConfigError as e:
        print(f"bulle node: {e}", file=sys.stderr)
        return 2


def _check(config) -> int:
    from nodes._engine import NodeEngine

    engine = NodeEngine(config)
    for t in engine.catalog().tables:
        quality = f"quality {t.quality.score}/100" if t.HasField("quality") else ""
        role = f"copy of {t.copy_of}'s" if t.copy_of else "shared" if t.shared else ""
        print(f"{t.name:<24} {t.tier:<11} {t.row_count_bucket:<9} {len(t.columns)} columns "
              f"{quality} {role}".rstrip())
    return 0


def _ingest(config, table: str | None, force: bool) -> int:
    from nodes._onboard import IngestError, ingest_node, proposal_path

    failed = 0
    for r in ingest_node(config, table, force=force):
        if isinstance(r, IngestError):
            failed += 1
            print(f"bulle node: {r} (the previous version, if any, still serves)",
                  file=sys.stderr)
        elif r.status == "unchanged":
            print(f"{r.table}: inputs unchanged, kept {r.output}")
        else:
            print(f"{r.table}: {r.rows} rows -> {r.output} (quality {r.score}/100)")
    if proposal_path(config).exists():
        print(f"schema and classification proposal: {proposal_path(config)}")
    return 2 if failed else 0


def _warm_dp_libraries(engine) -> None:
    # OpenDP and the ledger (SQLAlchemy); not dp-accounting: a node's own DP charges are
    # closed forms (privacy/_events.py), and a SQL node's image has none (issue 15).
    engine.guard.ledger  # noqa: B018 (opened here, not in the first DP query's time)
    import opendp.prelude  # noqa: F401


def _serve(config, superlink: str | None = None) -> int:
    from nodes._engine import NodeEngine
    from nodes._service import build_server

    log = logging.getLogger("bulle.node")
    engine = NodeEngine(config)
    metrics = None
    if config.metrics_listen:  # the operator's Prometheus endpoint (off by default)
        from nodes._metrics import NodeMetrics

        metrics = NodeMetrics(engine)
    server, port = build_server(config, engine, timer=metrics.interceptor if metrics else None)
    log.info("node %s serving %d tables on %s (port %d, mutual TLS)", config.node_id,
             len(config.datasets), config.listen, port)
    if any(d.tier == "sensitive" for d in config.datasets):
        # The DP libraries and the ledger load after the node serves, not before it does,
        # and not in the first DP query's time.
        threading.Thread(target=_warm_dp_libraries, args=(engine,), name="warm-dp",
                         daemon=True).start()
    if metrics is not None:
        log.info("metrics on http://%s/metrics (port %d)", config.metrics_listen,
                 metrics.serve(config.metrics_listen))
    flower = None
    if config.training is not None:  # DP training: a SuperNode and its executor, by PID
        from nodes._flower import NodeFlower, state_dir_of

        flower = NodeFlower(config, config.path, state_dir_of(engine), superlink)
        flower.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        log.info("node %s stopping", config.node_id)
        if flower is not None:
            flower.stop()
        server.stop(grace=5).wait()
        if metrics is not None:
            metrics.close()
        engine.close()
    return 0
