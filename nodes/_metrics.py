"""Prometheus metrics of a node agent, for its operator (``metrics_listen`` in the config).

Off by default; when on, a small HTTP listener (``prometheus_client``'s) serves ``/metrics``
on the address given — loopback by default, it has no authentication. Each node has its
own ``CollectorRegistry`` (tests run several nodes in one process).

Where the figures come from: the node's **audit chain**, tailed at each scrape from the
entry last seen (so DP training rounds, run by forked ClientApp processes, are counted
too), the gRPC calls timed by an interceptor, and the state files' sizes.

Nothing about one person: labels are only the node id, a *declared* dataset name (any
other table name becomes ``other``), the tier, an outcome from a fixed list, and gRPC
method and status names. No researcher, project or request id ever becomes a label.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PLAN_OUTCOMES = ("released", "replayed", "released_partly", "refused", "failed",
                 "interrupted")
TRAIN_OUTCOMES = {"train_released": "released", "train_replayed": "replayed",
                  "train_refused": "refused", "train_failed": "failed"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)


class _AuditFigures:
    """Counters folded from the audit chain's new entries (fixed vocabularies only)."""

    def __init__(self, node_id: str, tiers: dict[str, str]) -> None:
        self.node_id, self.tiers = node_id, tiers
        self.plans: dict[tuple[str, str, str], int] = {}  # (dataset, tier, outcome)
        self.epsilon: dict[tuple[str, str], float] = {}  # (dataset, tier)
        self.rounds: dict[tuple[str, str], int] = {}  # (dataset, outcome)
        self.references: dict[str, int] = {}  # received | refused | dropped
        self.seconds: list[float] = []  # released plans' durations, not yet observed

    def dataset(self, tables: Any) -> str:
        """The first declared dataset among ``tables``; ``other`` when none is."""
        names = [tables] if isinstance(tables, str) else list(tables or ())
        return next((t for t in names if t in self.tiers), "other")

    def fold(self, action: str, detail: dict[str, Any]) -> None:
        if action in PLAN_OUTCOMES:
            ds = self.dataset(detail.get("tables"))
            tier = str(detail.get("tier") or self.tiers.get(ds, "unknown"))
            key = (ds, tier if tier in ("open", "restricted", "sensitive") else "unknown",
                   action)
            self.plans[key] = self.plans.get(key, 0) + 1
            if action == "released" and isinstance(detail.get("ms"), (int, float)):
                self.seconds.append(detail["ms"] / 1000)
        elif action in ("charged", "train_charged") and not detail.get("replay"):
            ds = self.dataset(detail.get("dataset") or detail.get("table"))
            eps = detail.get("epsilon", detail.get("epsilon_round"))
            if isinstance(eps, (int, float)):
                key = (ds, self.tiers.get(ds, "unknown"))
                self.epsilon[key] = self.epsilon.get(key, 0.0) + float(eps)
        elif action in TRAIN_OUTCOMES:
            key = (self.dataset(detail.get("table")), TRAIN_OUTCOMES[action])
            self.rounds[key] = self.rounds.get(key, 0) + 1
        elif action.startswith("reference_"):
            what = action.removeprefix("reference_")
            self.references[what] = self.references.get(what, 0) + 1


class NodeCollector(Collector):
    """Reads the audit chain's new entries and the state at each scrape."""

    def __init__(self, node_id: str, engine: Any) -> None:
        self.node_id, self.engine = node_id, engine
        self.audit = engine.guard.audit
        self.figures = _AuditFigures(node_id, {d.table: d.tier for d in engine.config.datasets})
        self.last_seq = self.audit.head()[0]  # counters count from this process's start
        self.histogram = Histogram("bulle_node_plan_seconds", "time to answer a released "
                                   "plan (from the audit chain)", ["node"],
                                   buckets=LATENCY_BUCKETS, registry=None)
        self._lock = threading.Lock()

    def _tail(self) -> None:
        for e in self.audit.follow(self.last_seq):
            self.figures.fold(e.action, e.detail)
            self.last_seq = e.seq
        for s in self.figures.seconds:
            self.histogram.labels(self.node_id).observe(s)
        self.figures.seconds.clear()

    def collect(self) -> Iterator[Any]:
        with self._lock:
            self._tail()
        f, node = self.figures, self.node_id
        plans = CounterMetricFamily("bulle_node_plans", "plans received, by outcome",
                                    labels=["node", "dataset", "tier", "outcome"])
        for (ds, tier, outcome), n in sorted(f.plans.items()):
            plans.add_metric([node, ds, tier, outcome], n)
        yield plans
        eps = CounterMetricFamily("bulle_node_epsilon_charged", "ε charged to this node's "
                                  "ledger (queries and training rounds)",
                                  labels=["node", "dataset", "tier"])
        for (ds, tier), v in sorted(f.epsilon.items()):
            eps.add_metric([node, ds, tier], v)
        yield eps
        rounds = CounterMetricFamily("bulle_node_training_rounds", "DP training rounds, by "
                                     "outcome", labels=["node", "dataset", "outcome"])
        for (ds, outcome), n in sorted(f.rounds.items()):
            rounds.add_metric([node, ds, outcome], n)
        yield rounds
        refs = CounterMetricFamily("bulle_node_reference_events", "reference copies "
                                   "received, refused or dropped", labels=["node", "event"])
        for what, n in sorted(f.references.items()):
            refs.add_metric([node, what], n)
        yield refs
        yield from self.histogram.collect()
        yield from self._state()

    def _state(self) -> Iterator[Any]:
        node = self.node_id
        entries = GaugeMetricFamily("bulle_node_audit_entries", "entries in the audit chain",
                                    labels=["node"])
        entries.add_metric([node], self.last_seq)
        yield entries
        copies = GaugeMetricFamily("bulle_node_reference_copies", "other nodes' open tables "
                                   "held for joins", labels=["node"])
        copies.add_metric([node], len(getattr(self.engine, "copies", {}) or {}))
        yield copies
        size = GaugeMetricFamily("bulle_node_state_bytes", "size of the state files "
                                 "(with their WAL)", labels=["node", "store"])
        ledger = Path(self.audit.path).parent / "ledger.sqlite"  # PrivacyGuard's layout
        for store, path in (("ledger", ledger), ("audit", Path(self.audit.path)),
                            ("releases", ledger.parent / "releases.sqlite")):
            size.add_metric([node, store], _bytes(path))
        yield size
        rows = GaugeMetricFamily("bulle_node_ledger_rows", "rows of the privacy ledger: "
                                 "budgets (project × dataset) and charges (accepted and "
                                 "refused)", labels=["node", "table"])
        for table, n in zip(("budgets", "charges"), self.engine.guard.ledger_size(),
                            strict=True):
            rows.add_metric([node, table], n)
        yield rows


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


class RpcTimer(grpc.ServerInterceptor):
    """Times every RPC by method and gRPC status (refusals and failures included)."""

    def __init__(self, node_id: str, registry: CollectorRegistry) -> None:
        self.node_id = node_id
        self.seconds = Histogram("bulle_node_rpc_seconds", "gRPC calls served, by method "
                                 "and status", ["node", "method", "code"],
                                 buckets=LATENCY_BUCKETS, registry=registry)

    def intercept_service(self, continuation: Callable[[Any], grpc.RpcMethodHandler | None],
                          details: Any) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # no client-streaming methods in the contract

    def _observe(self, method: str, context: grpc.ServicerContext, started: float,
                 failed: bool) -> None:
        code = context.code() if hasattr(context, "code") else None
        name = code.name if isinstance(code, grpc.StatusCode) else ("UNKNOWN" if failed
                                                                     else "OK")
        self.seconds.labels(self.node_id, method, name).observe(time.perf_counter() - started)

    def _unary(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            started, failed = time.perf_counter(), True
            try:
                out = behaviour(request, context)
                failed = False
                return out
            finally:
                self._observe(method, context, started, failed)
        return timed

    def _stream(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        def timed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started, failed = time.perf_counter(), True
            try:
                yield from behaviour(request, context)
                failed = False
            finally:
                self._observe(method, context, started, failed)
        return timed


class NodeMetrics:
    """The node's registry, its gRPC timer and, when ``serve`` is called, its listener."""

    def __init__(self, engine: Any) -> None:
        node_id = engine.config.node_id
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(node_id, engine))
        self.interceptor = RpcTimer(node_id, self.registry)
        self._httpd: Any = None

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` on ``host:port`` (port 0: a free one); returns the port."""
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        self._httpd, _ = start_http_server(int(port), host or "127.0.0.1",
                                           registry=self.registry)
        return int(self._httpd.server_port)

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
