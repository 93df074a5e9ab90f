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


def tune_malloc() -> None:
    """Serve big replies from the heap instead of fresh ``mmap``s (glibc only).

    A 20 MB Arrow reply is copied several times on its way out (IPC, protobuf, gRPC); with
    glibc's default each copy is a new ``mmap`` whose every page faults on first touch
    (benchmarks/RESULTS.md §2: 140 → 85 ms for 1M rows). Process-wide, so set here, at
    the start of a long-running server; the heap keeps up to 256 MiB it could return.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not name:
        return
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl has no mallopt
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)
    libc.mallopt(m_top_pad, 64 << 20)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: bulle COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[:2] in (["node", "serve"], ["coordinator", "serve"]):
        tune_malloc()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
