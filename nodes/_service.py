"""The node's gRPC service: thin, it delegates to the engine. An interceptor authorises
every RPC (the coordinator's certificate name); ``PlanAudit`` writes the audit records.

Every answer that crosses the wire is either a disclosure-controlled result or a message
built without data. A plan that fails once accepted, whatever the cause (engine error,
memory, deadline, cancellation, a bug), gets one status and one message, the same at every
node: the cause and an incident id go to this node's log and audit chain only.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from nodes._compile import PlanRefused
from nodes._config import ConfigError, NodeConfig
from nodes._engine import FAILED, Deadline, NodeEngine, PlanFailed
from nodes._guard import PrivacyGuard
from nodes._receipts import NodeReceipts
from nodes._references import ReferenceRefused

log = logging.getLogger("bulle.node")
MAX_MESSAGE = 512 * 1024 * 1024
VERSION = "0.1.0"
FAILED_STATUS = grpc.StatusCode.INTERNAL  # every failure of an accepted plan
# Audit detail keys that never leave the node: a failure's cause may quote data (a value
# in an engine's message); its incident id is what the board sees and the operator looks up.
WITHHELD_DETAIL = frozenset({"cause"})
AUDIT_PAGE_MAX = 500


class ClientCertificateInterceptor(grpc.ServerInterceptor):
    """Authorises every RPC of the server (deny by default, whatever the method): TLS has
    verified the client's chain, this pins its identity to the coordinator's certificate
    name. A method added to the service is covered without a line in the servicer."""

    def __init__(self, allowed_client_cn: str) -> None:
        self.allowed_client_cn = allowed_client_cn.encode()

    def authorize(self, context: grpc.ServicerContext) -> None:
        names = context.auth_context().get("x509_common_name", [])
        if self.allowed_client_cn not in names:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "client certificate not allowed")

    def intercept_service(self, continuation: Callable[[Any], grpc.RpcMethodHandler | None],
                          handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        return None if handler is None else _checked(handler, self.authorize)


# The four shapes of a gRPC method and how to rebuild a handler of each.
_HANDLER_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _checked(handler: grpc.RpcMethodHandler,
             check: Callable[[grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    """``handler`` with ``check(context)`` run before its behaviour (which it may abort)."""
    for kind, rebuild in _HANDLER_KINDS:
        behaviour = getattr(handler, kind)
        if behaviour is None:
            continue

        def guarded(request: Any, context: grpc.ServicerContext,
                    behaviour: Callable[..., Any] = behaviour) -> Any:
            check(context)
            return behaviour(request, context)

        return rebuild(guarded, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    return handler


class PlanAudit:
    """What the node's audit chain records about a plan it was sent: its release, a
    streamed release (whole or partial), a refusal or a failure. Kept out of the servicer,
    which only moves messages."""

    def __init__(self, guard: PrivacyGuard) -> None:
        self.guard = guard

    def released(self, plan: pb.Plan, done: Any) -> None:
        r = done.result
        self.guard.record(plan, "replayed" if r.replayed else "released", {
            "tier": r.tier, "tables": _tables(plan),
            "rows": done.rows_out, "suppressed": r.suppressed_cells, "hidden": r.hidden_cells,
            "epsilon": r.epsilon_spent, "delta": r.delta_spent,
            "ms": round(done.seconds * 1000, 2)})

    def streamed(self, plan: pb.Plan, header: pb.PartialResult, rows: int, whole: bool,
                 started: float) -> None:
        self.guard.record(plan, "released" if whole else "released_partly", {
            "tier": header.tier, "tables": _tables(plan), "rows": rows, "streamed": True,
            "ms": round((time.perf_counter() - started) * 1000, 2)})

    @contextmanager
    def errors(self, plan: pb.Plan, context: grpc.ServicerContext,
               deadline: Deadline) -> Iterator[None]:
        """Static refusals (data-free, before any data is read) keep their message; every
        other failure is the one outcome FAILED_STATUS / FAILED, its cause on the audit
        chain (the board sees it, the caller never does)."""
        try:
            yield
        except PlanRefused as e:
            self.guard.record(plan, "refused", {"reason": str(e), "tables": _tables(plan)})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            failure = _failure(e, plan, deadline)
            detail = {"incident": failure.incident, "cause": failure.cause,
                      "tables": _tables(plan)}
            if failure.interrupted:
                detail.update(by=failure.interrupted, limit_s=round(deadline.seconds, 3))
            self.guard.record(plan, "interrupted" if failure.interrupted else "failed", detail)
            if failure.interrupted == "deadline" and _caller_deadline_reached(context):
                # The caller's own deadline: answer what its channel would say a moment
                # later anyway (our timer can fire a few ms before the caller's does).
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            context.abort(FAILED_STATUS, FAILED)


def _caller_deadline_reached(context: grpc.ServicerContext) -> bool:
    """Whether the RPC's deadline (set by the caller, known to it) is over or within timer
    jitter, as opposed to the node's own ``max_query_seconds`` having stopped the plan."""
    remaining = context.time_remaining()
    return remaining is not None and remaining < 0.1


def _failure(e: Exception, plan: pb.Plan, deadline: Deadline) -> PlanFailed:
    if isinstance(e, PlanFailed):
        return e
    # a bug or a limit met in Python (release, Arrow): the same outcome
    failure = PlanFailed(cause=f"{type(e).__name__}: {e}"[:1000], interrupted=deadline.cause)
    log.exception("plan %s failed (incident %s)", plan.request_id, failure.incident)
    return failure


class NodeServicer(pb_grpc.NodeServicer):
    """The node's RPCs, delegating to the engine. Authorisation is the server's
    interceptor (:class:`ClientCertificateInterceptor`), audit records :class:`PlanAudit`."""

    def __init__(self, engine: NodeEngine) -> None:
        self.engine = engine
        self.audit = PlanAudit(engine.guard)
        self.receipts = NodeReceipts(engine.config.node_id, engine.state_dir)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(node_id=self.engine.config.node_id, status="serving",
                              version=VERSION)

    def GetCatalog(self, request: pb.CatalogRequest, context: grpc.ServicerContext) -> pb.Catalog:
        out = self.engine.catalog()
        out.receipt_public_key = self.receipts.public_pem
        return out

    def FetchReference(self, request: pb.ReferenceRequest,
                       context: grpc.ServicerContext) -> pb.ReferenceTable:
        with _references(context, "fetch", request.table):
            return self.engine.fetch_reference(request.table)

    def PutReference(self, request: pb.ReferenceTable,
                     context: grpc.ServicerContext) -> pb.ReferenceAck:
        with _references(context, "put", request.info.name):
            return pb.ReferenceAck(info=self.engine.put_reference(request))

    def VerifyAudit(self, request: pb.AuditRequest,
                    context: grpc.ServicerContext) -> pb.AuditReport:
        audit = self.engine.guard.audit
        checkpoint = ((request.checkpoint_seq, request.checkpoint_hash)
                      if request.checkpoint_seq > 0 else None)
        head_seq, head_hash = audit.head()  # before verifying: the chain covers this head
        report = audit.verify(checkpoint)
        return pb.AuditReport(ok=report.ok, entries=report.entries,
                              first_bad_seq=report.first_bad_seq or 0, reason=report.reason,
                              head_seq=head_seq, head_hash=head_hash)

    def ListAudit(self, request: pb.AuditPageRequest,
                  context: grpc.ServicerContext) -> pb.AuditPage:
        return audit_page(self.engine.guard.audit, request)

    def DropReference(self, request: pb.ReferenceRequest,
                      context: grpc.ServicerContext) -> pb.ReferenceAck:
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
        deadline = self._deadline(context)
        try:
            with self.audit.errors(plan, context, deadline):
                done = self.engine.execute(plan, deadline)
        finally:
            deadline.close()
        self.audit.released(plan, done)
        return self.receipts.sign(plan, done.result)  # the partial's signed statement

    def ExecuteRows(self, plan: pb.Plan, context: grpc.ServicerContext) -> Iterator[pb.RowChunk]:
        started, rows, sent = time.perf_counter(), 0, None
        deadline = self._deadline(context)
        try:
            with self.audit.errors(plan, context, deadline):
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
                        self.audit.streamed(plan, header, rows, sent, started)
        finally:
            deadline.close()


def audit_page(audit: Any, request: pb.AuditPageRequest) -> pb.AuditPage:
    """A page of the chain as stored (not verified here: the reader checks the links), with
    :data:`WITHHELD_DETAIL` keys removed and named."""
    limit = min(max(request.limit or 50, 1), AUDIT_PAGE_MAX)
    head_seq, head_hash = audit.head()
    after = max(head_seq - limit, 0) if request.tail else max(request.after_seq, 0)
    page = pb.AuditPage(head_seq=head_seq, head_hash=head_hash)
    for e in audit.entries_after(after, limit):
        withheld = sorted(WITHHELD_DETAIL & set(e.detail))
        shown = {k: v for k, v in e.detail.items() if k not in WITHHELD_DETAIL}
        page.entries.append(pb.AuditRecord(
            seq=e.seq, time=e.time, actor=e.actor, project=e.project, action=e.action,
            detail_json=json.dumps(shown, sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False),
            prev_hash=e.prev_hash, hash=e.hash, withheld=withheld))
    return page


def _tables(plan: pb.Plan) -> list[str]:
    return sorted({plan.source.table, *(j.table.table for j in plan.joins)})


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


def build_server(config: NodeConfig, engine: NodeEngine, workers: int = 8,
                 timer: grpc.ServerInterceptor | None = None) -> tuple[grpc.Server, int]:
    """A started gRPC server with mutual TLS; returns it and the bound port. ``timer``:
    the metrics' RPC timer (nodes/_metrics.py), after the authorisation."""
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
        interceptors=[ClientCertificateInterceptor(config.tls.allowed_client_cn),
                      *([timer] if timer else [])],
        options=[("grpc.max_send_message_length", MAX_MESSAGE),
                 ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                 ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_NodeServicer_to_server(NodeServicer(engine), server)
    port = server.add_secure_port(config.listen, creds)
    if port == 0:
        raise ConfigError(f"node {config.node_id}: cannot listen on {config.listen}")
    server.start()
    return server, port
