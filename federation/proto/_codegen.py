"""Regenerate the committed gRPC stubs: ``python -m federation.proto._codegen``.

The drift test (tests/test_proto_drift.py) calls :func:`generate` into a temporary folder
and compares the bytes with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "federation/proto/bulle.proto"
OUTPUTS = ("bulle_pb2.py", "bulle_pb2.pyi", "bulle_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc on the contract; returns the generated files under ``out_root``."""
    from grpc_tools import protoc  # dev dependency only

    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + PROTO)
    return [out_root / "federation" / "proto" / name for name in OUTPUTS]


if __name__ == "__main__":
    generate(ROOT)
    sys.exit(0)
