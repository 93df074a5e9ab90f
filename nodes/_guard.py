"""The node's own privacy guard: grants, its ledger, the release cache and the audit chain.
(The cache itself, shared with training rounds, is ``nodes/_releases.py``.)

The node never trusts the coordinator: a plan on sensitive data runs only with a grant
signed by the ethics board for this project, researcher and dataset, and its charge is
written to this node's ledger (atomically, idempotently on the request id) *before* the
plan runs, so a failure is never free. A replayed request id gets the very same outcome
back — the release, or the failure — never a fresh noise draw (averaging would undo the
noise) nor a second evaluation for one charge.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation.proto import bulle_pb2 as pb
from nodes._compile import PlanRefused
from nodes._config import ConfigError
from nodes._dp import DpSpec
from nodes._releases import QUERY, ReleaseStore
from privacy import AuditLog, Grant, GrantError, verify_grant

if TYPE_CHECKING:
    from privacy import Ledger


class PrivacyGuard:
    def __init__(self, node_id: str, state_dir: Path, board_public_key: Path | None) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        if board_public_key is not None and not board_public_key.is_file():
            raise ConfigError(f"node {node_id}: board public key not found: {board_public_key}")
        self.board_key = board_public_key.read_bytes() if board_public_key else None
        self._ledger_path = str(state_dir / "ledger.sqlite")
        self._ledger: Ledger | None = None
        self._ledger_lock = threading.Lock()
        self.audit = AuditLog(state_dir / "audit.sqlite")
        self.releases = ReleaseStore(state_dir / "releases.sqlite")  # queries and training
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._budgets: dict[tuple[str, str], tuple[float, float]] = {}

    @property
    def ledger(self) -> Ledger:
        """The budget ledger, opened on first use: SQLAlchemy (~0.2 s and ~15 MB of imports)
        loads only in a node that charges (DP queries, training), soon after it serves."""
        with self._ledger_lock:
            if self._ledger is None:
                from privacy import Ledger

                self._ledger = Ledger(self._ledger_path)
            return self._ledger

    def ledger_size(self) -> tuple[int, int]:
        """(budgets, charges) rows; (0, 0) without opening a ledger that was never made."""
        if self._ledger is None and not Path(self._ledger_path).exists():
            return 0, 0
        return self.ledger.size()

    def request_lock(self, request_id: str) -> threading.Lock:
        """One release per request id at a time in this process."""
        with self._locks_guard:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(request_id, threading.Lock())

    # -- grants -------------------------------------------------------------------------
    def admit(self, plan: pb.Plan, dataset: str) -> Grant:
        if self.board_key is None:
            raise PlanRefused("this node has no ethics-board key configured: it serves no "
                              "sensitive data")
        try:
            grant = verify_grant(plan.privacy.grant, self.board_key, datetime.now(UTC))
        except GrantError as e:
            raise PlanRefused(f"grant refused ({e.code})") from None
        if grant.project != plan.project:
            raise PlanRefused("the grant is for another project")
        if plan.researcher not in grant.researchers:
            raise PlanRefused("the grant does not name this researcher")
        if dataset not in grant.datasets:
            raise PlanRefused(f"the grant does not cover dataset {dataset!r}")
        if plan.privacy.delta > grant.delta:
            raise PlanRefused("the plan's δ exceeds the grant's")
        key = (grant.project, dataset)
        if self._budgets.get(key) != (grant.epsilon, grant.delta):
            self.ledger.set_budget(grant.project, dataset, grant.epsilon, grant.delta)
            self._budgets[key] = (grant.epsilon, grant.delta)
        return grant

    # -- releases -----------------------------------------------------------------------
    def cached(self, request_id: str) -> pb.PartialResult | None:
        kept = self.releases.get(request_id)
        if kept is None:
            return None
        result = pb.PartialResult.FromString(kept[0])
        result.replayed = True
        return result

    def failure(self, request_id: str) -> tuple[str, str] | None:
        """(public message, incident) of a charged plan that failed while running."""
        return self.releases.failure(request_id)

    def charge(self, plan: pb.Plan, spec: DpSpec) -> Any:
        """Charge this node's ledger before the plan runs; refuses (PlanRefused, nothing
        charged) when the budget would overflow. A replay of an accepted charge (the node
        stopped after charging, before storing an outcome) charges nothing more."""
        outcome = self.ledger.charge(plan.request_id, plan.project, spec.table, spec.event(),
                                     epsilon_claim=spec.epsilon)
        if not outcome.accepted and not outcome.replay:
            raise PlanRefused(
                f"privacy budget of project {plan.project!r} on {spec.table!r} at node "
                f"{self.node_id} exhausted: this query needs ε={outcome.needed_epsilon:.4g}, "
                f"{outcome.remaining_epsilon:.4g} is left")
        if not outcome.accepted:
            raise PlanRefused("this request id was refused before")
        self.record(plan, "charged", {
            "dataset": spec.table, "epsilon": spec.epsilon, "delta": spec.delta,
            "replay": outcome.replay, "composed_epsilon_spent": outcome.spent_epsilon,
            "composed_epsilon_growth": outcome.needed_epsilon})
        return outcome

    def store(self, request_id: str, result: pb.PartialResult) -> None:
        self.releases.put(request_id, QUERY, result.SerializeToString())

    def store_failure(self, request_id: str, public: str, incident: str) -> None:
        self.releases.put_failure(request_id, public, incident)

    def record(self, plan: pb.Plan, action: str, detail: dict[str, Any]) -> None:
        self.audit.append(plan.researcher[:128] or "?", plan.project[:128], action, {
            "node": self.node_id, "request_id": plan.request_id[:64],
            "query_sha256": plan.query_sha256[:64], **detail})
