"""``bulle`` — a thin dispatcher: each package owns its subcommands in its own ``cli.py``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "node": ("nodes.cli", "run a node agent (serve, check, ingest, doctor)"),
    "coordinator": ("federation.cli", "run the coordinator (serve)"),
    "certs": ("federation.cli", "create a local CA and certificates for a demo or test"),
    "demo": ("enclave.cli", "start, stop and inspect the demo federation (up, down, env, status)"),
    "board": ("enclave.cli", "ethics board: keygen, grant, show, list, approve, refuse, export"),
    "audit": ("enclave.cli", "verify hash-chained audit logs"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: bulle COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
