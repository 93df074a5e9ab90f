"""The .proto is the contract: the committed stubs must be exactly what protoc makes."""

from __future__ import annotations

from pathlib import Path

from federation.proto._codegen import ROOT, generate


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    for generated in generate(tmp_path):
        committed = ROOT / "federation" / "proto" / generated.name
        assert committed.exists(), f"{committed.name} is not committed"
        assert generated.read_bytes() == committed.read_bytes(), (
            f"{committed.name} drifted from bulle.proto: run "
            "`python -m federation.proto._codegen` and commit the result")


def test_every_node_rpc_has_a_servicer() -> None:
    from federation.proto import bulle_pb2
    from nodes._service import NodeServicer

    service = bulle_pb2.DESCRIPTOR.services_by_name["Node"]
    for method in service.methods:
        assert method.name in NodeServicer.__dict__, f"{method.name} is not implemented"
