"""The node's gRPC service: thin, it authenticates the caller and delegates to the engine.

Every answer that crosses the wire is either a disclosure-controlled result or a message
built without data. A plan that fails once accepted, whatever the cause (engine error,
memory, deadline, cancellation, a bug), gets one status and one message, the same at every
node: the cause and an incident id go to this node's log and audit chain only.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc

from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from nodes._compile import PlanRefused
from nodes._config import ConfigError, NodeConfig
from nodes._engine import FAILED, Deadline, NodeEngine, PlanFailed
from nodes._guard import PrivacyGuard
from nodes._references import ReferenceRefused

log = logging.getLogger("bulle.node")
MAX_MESSAGE = 512 * 1024 * 1024
VERSION = "0.1.0"
FAILED_STATUS = grpc.StatusCode.INTERNAL  # every failure of an accepted plan


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, engine: NodeEngine, allowed_client_cn: str) -> None:
        self.engine = engine
        self.allowed_client_cn = allowed_client_cn.encode()

    def _authorize(self, context: grpc.ServicerContext) -> None:
        # TLS already verified the chain; this pins the identity to the coordinator's.
        names = context.auth_context().get("x509_common_name", [])
        if self.allowed_client_cn not in names:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "client certificate not allowed")

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        self._authorize(context)
        return pb.HealthReply(node_id=self.engine.config.node_id, status="serving",
                              version=VERSION)

    def GetCatalog(self, request: pb.CatalogRequest, context: grpc.ServicerContext) -> pb.Catalog:
        self._authorize(context)
        return self.engine.catalog()

    def FetchReference(self, request: pb.ReferenceRequest,
                       context: grpc.ServicerContext) -> pb.ReferenceTable:
        self._authorize(context)
        with _references(context, "fetch", request.table):
            return self.engine.fetch_reference(request.table)

    def PutReference(self, request: pb.ReferenceTable,
                     context: grpc.ServicerContext) -> pb.ReferenceAck:
        self._authorize(context)
        with _references(context, "put", request.info.name):
            return pb.ReferenceAck(info=self.engine.put_reference(request))

    def VerifyAudit(self, request: pb.AuditRequest,
                    context: grpc.ServicerContext) -> pb.AuditReport:
        self._authorize(context)
        audit = self.engine.guard.audit
        checkpoint = ((request.checkpoint_seq, request.checkpoint_hash)
                      if request.checkpoint_seq > 0 else None)
        head_seq, head_hash = audit.head()  # before verifying: the chain covers this head
        report = audit.verify(checkpoint)
        return pb.AuditReport(ok=report.ok, entries=report.entries,
                              first_bad_seq=report.first_bad_seq or 0, reason=report.reason,
                              head_seq=head_seq, head_hash=head_hash)

    def DropReference(self, request: pb.ReferenceRequest,
                      context: grpc.ServicerContext) -> pb.ReferenceAck:
        self._authorize(context)
        with _references(context, "drop", request.table):
            return pb.ReferenceAck(info=self.engine.drop_reference(request.table))

    def _deadline(self, context: grpc.ServicerContext) -> Deadline:
        """The caller's deadline (capped by the node's own), and its cancellation."""
        deadline = self.engine.deadline(context.time_remaining())

        def ended() -> None:  # runs when the RPC ends, also after a normal answer
            deadline.fire("deadline" if deadline.expired() else "cancelled")

        if not context.add_callback(ended):  # already over
            ended()
        return deadline

    def Execute(self, plan: pb.Plan, context: grpc.ServicerContext) -> pb.PartialResult:
        self._authorize(context)
        guard = self.engine.guard
        deadline = self._deadline(context)
        try:
            with _plan_errors(guard, plan, context, deadline):
                done = self.engine.execute(plan, deadline)
        finally:
            deadline.close()
        r = done.result
        guard.record(plan, "replayed" if r.replayed else "released", {
            "tier": r.tier, "tables": _tables(plan),
            "rows": done.rows_out, "suppressed": r.suppressed_cells, "hidden": r.hidden_cells,
            "epsilon": r.epsilon_spent, "delta": r.delta_spent,
            "ms": round(done.seconds * 1000, 2)})
        return r

    def ExecuteRows(self, plan: pb.Plan, context: grpc.ServicerContext) -> Iterator[pb.RowChunk]:
        self._authorize(context)
        guard = self.engine.guard
        started, rows, sent = time.perf_counter(), 0, None
        deadline = self._deadline(context)
        try:
            with _plan_errors(guard, plan, context, deadline):
                header, pieces = self.engine.execute_rows(plan, deadline)
                try:
                    yield pb.RowChunk(header=header)
                    sent = False
                    for data, n in pieces:
                        yield pb.RowChunk(arrow_ipc=data)
                        rows += n
                    sent = True
                finally:  # what left is on the record, even when the caller went away
                    pieces.close()  # its query, cursor and reader end now
                    if sent is not None:
                        guard.record(plan, "released" if sent else "released_partly", {
                            "tier": header.tier, "tables": _tables(plan), "rows": rows,
                            "streamed": True,
                            "ms": round((time.perf_counter() - started) * 1000, 2)})
        finally:
            deadline.close()


def _tables(plan: pb.Plan) -> list[str]:
    return sorted({plan.source.table, *(j.table.table for j in plan.joins)})


@contextmanager
def _plan_errors(guard: PrivacyGuard, plan: pb.Plan, context: grpc.ServicerContext,
                 deadline: Deadline) -> Iterator[None]:
    """Static refusals (data-free, before any data is read) keep their message; every
    other failure is the one outcome FAILED_STATUS / FAILED, its cause on the audit chain
    (the board sees it, the caller never does)."""
    try:
        yield
    except PlanRefused as e:
        guard.record(plan, "refused", {"reason": str(e)})
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception as e:
        if isinstance(e, PlanFailed):
            failure = e
        else:  # a bug or a limit met in Python (release, Arrow): the same outcome
            failure = PlanFailed(cause=f"{type(e).__name__}: {e}"[:1000],
                                 interrupted=deadline.cause)
            log.exception("plan %s failed (incident %s)", plan.request_id, failure.incident)
        detail = {"incident": failure.incident, "cause": failure.cause}
        if failure.interrupted:
            detail.update(by=failure.interrupted, limit_s=round(deadline.seconds, 3))
        guard.record(plan, "interrupted" if failure.interrupted else "failed", detail)
        context.abort(FAILED_STATUS, FAILED)


@contextmanager
def _references(context: grpc.ServicerContext, what: str, table: str) -> Iterator[None]:
    try:
        yield
    except ReferenceRefused as e:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("reference %s of %r failed (incident %s)", what, table[:64], incident)
        context.abort(grpc.StatusCode.INTERNAL, f"node error (node incident {incident})")


def build_server(config: NodeConfig, engine: NodeEngine,
                 workers: int = 8) -> tuple[grpc.Server, int]:
    """A started gRPC server with mutual TLS; returns it and the bound port."""
    if config.tls is None:
        raise ConfigError(f"node {config.node_id}: [tls] is required (mutual TLS)")
    for label, path in (("cert", config.tls.cert), ("key", config.tls.key),
                        ("client_ca", config.tls.client_ca)):
        if not path.is_file():
            raise ConfigError(f"node {config.node_id}: tls {label} file not found: {path}")
    creds = grpc.ssl_server_credentials(
        [(config.tls.key.read_bytes(), config.tls.cert.read_bytes())],
        root_certificates=config.tls.client_ca.read_bytes(),
        require_client_auth=True,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bulle-node"),
        options=[("grpc.max_send_message_length", MAX_MESSAGE),
                 ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                 ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_NodeServicer_to_server(NodeServicer(engine, config.tls.allowed_client_cn), server)
    port = server.add_secure_port(config.listen, creds)
    if port == 0:
        raise ConfigError(f"node {config.node_id}: cannot listen on {config.listen}")
    server.start()
    return server, port
