"""Prometheus metrics of the coordinator: ``GET /metrics`` on its HTTP API.

Who may scrape: a caller with ``custom:bulle:audit`` (a hub user for the monitoring system,
e.g. ``prometheus`` with an auditor role and an API token given to Prometheus as its
``bearer_token_file``), the same scope that reads the audit chain. The figures are
aggregates, but they say how busy each project's federation is: not for everyone.

Where the figures come from: the coordinator's **audit chain**, tailed at each scrape from
the entry last seen (queries and their outcome, tier, error code and duration, ε charged,
training rounds, board decisions, node registry changes), and its state at scrape time
(audit length, ledger rows, registered nodes and whether each answered its last catalogue
call, reference copies that failed to ship). One ``CollectorRegistry`` per app.

Nothing about one person: labels are a tier, an outcome, an error code from the error
catalogue (``federation/_errors.py``), a node id. No researcher, project, query or SQL.
"""


import threading
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

TIERS = ("open", "restricted", "sensitive")
QUERY_OUTCOMES = ("released", "refused", "error")
TRAIN_FINAL = ("finished", "failed", "cancelled", "budget_exhausted")
DECISIONS = {"project_approved": "approved", "project_amended": "amended",
             "project_refused": "refused", "project_submitted": "submitted"}
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
_CODE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_")


class _Figures:
    """Counters folded from the audit chain's new entries (fixed vocabularies only)."""

    def __init__(self) -> None:
        self.queries: dict[tuple[str, str, str], int] = {}  # (tier, outcome, code)
        self.epsilon = 0.0
        self.rounds: dict[str, int] = {}  # train | evaluate
        self.trainings: dict[str, int] = {}  # submitted | final status
        self.decisions: dict[str, int] = {}
        self.node_changes: dict[str, int] = {}  # added | removed
        self.seconds: list[tuple[str, float]] = []  # (outcome, s) not yet observed

    def fold(self, action: str, d: dict[str, Any]) -> None:
        if action in QUERY_OUTCOMES:
            tier = d.get("tier") if d.get("tier") in TIERS else "unknown"
            code = "ok" if action == "released" else str(d.get("code") or "internal")
            code = code if len(code) <= 40 and set(code) <= _CODE_CHARS else "other"
            key = (tier, action, code)
            self.queries[key] = self.queries.get(key, 0) + 1
            if isinstance(d.get("ms"), (int, float)):
                self.seconds.append((action, d["ms"] / 1000))
        elif action == "charged" and not d.get("replay"):
            if isinstance(d.get("epsilon"), (int, float)):
                self.epsilon += float(d["epsilon"])
        elif action in ("train_round_released", "train_eval_released"):
            kind = "train" if action == "train_round_released" else "evaluate"
            self.rounds[kind] = self.rounds.get(kind, 0) + 1
        elif action == "train_submitted" or action.removeprefix("train_") in TRAIN_FINAL:
            status = action.removeprefix("train_")
            self.trainings[status] = self.trainings.get(status, 0) + 1
        elif action in DECISIONS:
            self.decisions[DECISIONS[action]] = self.decisions.get(DECISIONS[action], 0) + 1
        elif action in ("node_added", "node_removed"):
            what = action.removeprefix("node_")
            self.node_changes[what] = self.node_changes.get(what, 0) + 1


def _counter(name: str, doc: str, labels: list[str], items: dict[Any, float]
             ) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(items.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


class CoordinatorCollector(Collector):
    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self.audit = coordinator.projects.audit
        self.last_seq = self.audit.head()[0]  # counters count from this process's start
        self.figures = _Figures()
        self.histogram = Histogram("bulle_coordinator_query_seconds", "time from submission "
                                   "to answer of a federated query, by outcome", ["outcome"],
                                   buckets=LATENCY_BUCKETS, registry=None)
        self._lock = threading.Lock()

    def _tail(self) -> None:
        for e in self.audit.follow(self.last_seq):
            self.figures.fold(e.action, e.detail)
            self.last_seq = e.seq
        for outcome, s in self.figures.seconds:
            self.histogram.labels(outcome).observe(s)
        self.figures.seconds.clear()

    def collect(self) -> Iterator[Any]:
        with self._lock:
            self._tail()
        f = self.figures
        yield _counter("bulle_coordinator_queries", "federated queries, by tier, outcome and "
                       "error code", ["tier", "outcome", "code"], f.queries)
        eps = CounterMetricFamily("bulle_coordinator_epsilon_charged", "ε charged to the "
                                  "projects' global ledger (composition not applied)")
        eps.add_metric([], f.epsilon)
        yield eps
        yield _counter("bulle_coordinator_training_rounds", "DP training rounds released, "
                       "by kind", ["kind"], f.rounds)
        yield _counter("bulle_coordinator_trainings", "DP training jobs submitted and ended, "
                       "by status", ["status"], f.trainings)
        yield _counter("bulle_coordinator_board_decisions", "projects submitted and the "
                       "board's decisions", ["outcome"], f.decisions)
        yield _counter("bulle_coordinator_node_changes", "nodes added to or removed from the "
                       "registry", ["outcome"], f.node_changes)
        yield from self.histogram.collect()
        yield from self._state()

    def _state(self) -> Iterator[Any]:
        c = self.coordinator
        entries = GaugeMetricFamily("bulle_coordinator_audit_entries", "entries in the "
                                    "coordinator's audit chain")
        entries.add_metric([], self.last_seq)
        yield entries
        rows = GaugeMetricFamily("bulle_coordinator_ledger_rows", "rows of the global ledger",
                                 labels=["table"])
        for table, n in zip(("budgets", "charges"), c.projects.ledger.size(), strict=True):
            rows.add_metric([table], n)
        yield rows
        up = GaugeMetricFamily("bulle_coordinator_node_up", "1 if the node answered the last "
                               "catalogue call, 0 if not", labels=["node"])
        status = dict(getattr(c, "_node_status", {}) or {})
        for nid in sorted(c.clients):
            up.add_metric([nid], 1.0 if status.get(nid) == "up" else 0.0)
        yield up
        problems = GaugeMetricFamily("bulle_coordinator_reference_problems", "reference "
                                     "copies that failed to ship at the last sync")
        problems.add_metric([], len(c.references.problems))
        yield problems


def add_metrics_route(app: FastAPI, coordinator: Any, Who: Any,
                      require: Any) -> None:
    """``GET /metrics`` (scope: see ``ENDPOINT_SCOPES``), on a registry of its own. (No
    ``from __future__ import annotations`` here: FastAPI reads ``Who`` at runtime.)"""
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(coordinator))

    @app.get("/metrics", include_in_schema=False)
    def metrics(who: Who) -> Response:
        require(who, "GET /metrics")
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
