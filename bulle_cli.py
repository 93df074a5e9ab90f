"""``bulle`` — a thin dispatcher: each package owns its subcommands in its own ``cli.py``."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "node": ("nodes.cli", "run a node agent (serve, check, ingest, doctor)"),
    "coordinator": ("federation.cli", "run the coordinator (serve)"),
    "certs": ("federation.cli", "create a local CA and certificates for a demo or test"),
    "demo": ("bulle_demo.cli", "start, stop and inspect the demo federation (up, down, env, "
             "status, add-node)"),
    "board": ("enclave.cli", "ethics board: keygen, grant, show, list, approve, refuse, export"),
    "audit": ("enclave.cli", "verify hash-chained audit logs"),
    "receipt": ("enclave.cli", "verify a signed release receipt offline (verify FILE --keys)"),
}


def tune_malloc() -> None:
    """Serve big replies from the heap instead of fresh ``mmap``s (glibc only).

    A 20 MB Arrow reply is copied several times on its way out (IPC, protobuf, gRPC); with
    glibc's default each copy is a new ``mmap`` whose every page faults on first touch
    (benchmarks/RESULTS.md §2: 140 → 85 ms for 1M rows). Process-wide, so set here, at
    the start of a long-running server; the heap keeps up to 256 MiB it could return.
    ``BULLE_MALLOC_TUNING=0`` leaves glibc's defaults.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if os.environ.get("BULLE_MALLOC_TUNING", "1") == "0" or not name \
            or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # musl has no mallopt
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, 64 << 20), (m_trim_threshold, 256 << 20),
                          (m_top_pad, 64 << 20)):
        if libc.mallopt(option, value) != 1:  # 1 = accepted; the defaults then stay
            print(f"bulle: malloc tuning {option}={value} refused by the C library",
                  file=sys.stderr)


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
