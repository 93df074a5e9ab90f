"""gRPC clients for the nodes (mutual TLS with the coordinator's certificate)."""

from __future__ import annotations

import grpc

from federation._config import CoordinatorConfig, NodeEndpoint
from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc

MAX_MESSAGE = 512 * 1024 * 1024


class NodeClient:
    def __init__(self, endpoint: NodeEndpoint, creds: grpc.ChannelCredentials) -> None:
        self.id = endpoint.id
        self.address = endpoint.address
        self.channel = grpc.secure_channel(endpoint.address, creds, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
        ])
        self.stub = pb_grpc.NodeStub(self.channel)

    def catalog(self, timeout: float) -> pb.Catalog:
        return self.stub.GetCatalog(pb.CatalogRequest(), timeout=timeout)

    def execute(self, plan: pb.Plan, timeout: float) -> pb.PartialResult:
        return self.stub.Execute(plan, timeout=timeout)

    def execute_rows(self, plan: pb.Plan, timeout: float) -> tuple[pb.PartialResult, bytes]:
        """A row plan, streamed: the node's header and the whole Arrow IPC stream."""
        header, pieces = None, []
        for chunk in self.stub.ExecuteRows(plan, timeout=timeout):
            if chunk.HasField("header"):
                header = chunk.header
            else:
                pieces.append(chunk.arrow_ipc)
        if header is None:
            raise ValueError(f"node {self.id} streamed no header")
        return header, b"".join(pieces)

    def fetch_reference(self, table: str, timeout: float) -> pb.ReferenceTable:
        return self.stub.FetchReference(pb.ReferenceRequest(table=table), timeout=timeout)

    def put_reference(self, ref: pb.ReferenceTable, timeout: float) -> pb.ReferenceAck:
        return self.stub.PutReference(ref, timeout=timeout)

    def drop_reference(self, table: str, timeout: float) -> pb.ReferenceAck:
        return self.stub.DropReference(pb.ReferenceRequest(table=table), timeout=timeout)

    def verify_audit(self, checkpoint: tuple[int, str] | None,
                     timeout: float) -> pb.AuditReport:
        seq, digest = checkpoint or (0, "")
        return self.stub.VerifyAudit(pb.AuditRequest(checkpoint_seq=seq,
                                                     checkpoint_hash=digest), timeout=timeout)

    def list_audit(self, after_seq: int, limit: int, tail: bool,
                   timeout: float) -> pb.AuditPage:
        return self.stub.ListAudit(pb.AuditPageRequest(after_seq=after_seq, limit=limit,
                                                       tail=tail), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def client_credentials(config: CoordinatorConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=config.ca.read_bytes(),
        private_key=config.key.read_bytes(),
        certificate_chain=config.cert.read_bytes(),
    )


# The codes of answers built without data: a node's static refusal (and a certificate
# mismatch); everything else after a node accepted a plan is the one uniform failure
# (nodes/_service.py), and a deadline passed or a stream cut is treated like it.
_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.PERMISSION_DENIED)


def rpc_outcome(err: grpc.RpcError) -> str:
    """What a node's error means for a query: "refused", "unreachable" or "failed"."""
    code = err.code() if hasattr(err, "code") else None
    if code in _REFUSALS:
        return "refused"
    return "unreachable" if code == grpc.StatusCode.UNAVAILABLE else "failed"


def describe_rpc_error(node_id: str, err: grpc.RpcError, timeout: float) -> str:
    """A reason for a node's error, for the catalogue, status and reference pages (a query's
    own failures are reported by ``rpc_outcome``: see ``Coordinator._fan_out``)."""
    outcome = rpc_outcome(err)
    if outcome == "refused":  # the node's refusal messages are built without data
        return f"refused: {err.details()}"
    if outcome == "unreachable":
        return "unreachable"
    code = err.code() if hasattr(err, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout:g} s"
    return "failed"
