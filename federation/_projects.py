"""Projects at the coordinator: their signed grants, the global ledger and the audit chain.

The coordinator's ledger is per project across the whole federation (one budget scope
``*``): the same pupil may be at a regional node and at a vendor node, so each node's own
per-dataset ledger cannot see the whole spend. It is charged after the nodes answered and
before anything is released to the researcher; if the charge does not fit, the result is
withheld (the nodes' own charges stand: their results did leave them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dp_accounting as dpa

from federation._config import CoordinatorConfig, ProjectConfig, Researcher
from federation._errors import QueryError
from privacy import AuditLog, Grant, GrantError, Ledger, pld_epsilon, verify_grant
from privacy._ledger import PROJECT_WIDE


@dataclass(frozen=True)
class Budget:
    project: str
    epsilon: float
    delta: float
    spent: float
    expires: str

    @property
    def remaining(self) -> float:
        return max(self.epsilon - self.spent, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"project": self.project, "epsilon": self.epsilon, "delta": self.delta,
                "epsilon_spent": self.spent, "epsilon_remaining": self.remaining,
                "expires": self.expires}


class Projects:
    def __init__(self, config: CoordinatorConfig) -> None:
        state = config.state_dir or Path.cwd() / "coordinator-state"
        state.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(config.database_url or str(state / "ledger.sqlite"))
        self.audit = AuditLog(state / "audit.sqlite")
        self.board_key = config.board_public_key.read_bytes() \
            if config.board_public_key else None
        self.configs = {p.name: p for p in config.projects}
        self.tokens: dict[str, str] = {}
        self._budgets: dict[str, tuple[float, float]] = {}  # caps already in the ledger
        for p in config.projects:
            if p.grant is not None:
                self.tokens[p.name] = p.grant.read_text().strip()

    def config(self, project: str) -> ProjectConfig:
        return self.configs.get(project) or ProjectConfig(project)

    def grant(self, project: str) -> tuple[Grant, str]:
        token = self.tokens.get(project)
        if token is None or self.board_key is None:
            raise QueryError("no_grant", f"project {project!r} has no grant from the ethics "
                             "board: sensitive data cannot be queried", status=403)
        try:
            grant = verify_grant(token, self.board_key, datetime.now(UTC))
        except GrantError as e:
            raise QueryError("no_grant", f"the grant of project {project!r} is not valid "
                             f"({e.code})", status=403) from None
        if self._budgets.get(project) != (grant.epsilon, grant.delta):
            self.ledger.set_budget(project, PROJECT_WIDE, grant.epsilon, grant.delta)
            self._budgets[project] = (grant.epsilon, grant.delta)
        return grant, token

    def check(self, grant: Grant, researcher: Researcher, tables: list[str]) -> None:
        if researcher.name not in grant.researchers:
            raise QueryError("forbidden", "the project's grant does not name you", status=403)
        missing = sorted(set(tables) - set(grant.datasets))
        if missing:
            raise QueryError("forbidden", f"the project's grant does not cover "
                             f"{', '.join(missing)}", status=403)

    def budget(self, project: str) -> Budget:
        grant, _ = self.grant(project)
        spent, delta = self.ledger.spent(project, PROJECT_WIDE)
        return Budget(project, grant.epsilon, delta, spent, grant.expires.isoformat())

    def charge(self, query_id: str, project: str, event: dpa.DpEvent, epsilon: float
               ) -> Any:
        outcome = self.ledger.charge(query_id, project, PROJECT_WIDE, event,
                                     epsilon_claim=epsilon)
        if not outcome.accepted:
            raise QueryError(
                "budget_exhausted",
                f"privacy budget of project {project!r} exhausted: this query needs "
                f"ε={outcome.needed_epsilon:.4g}, {outcome.remaining_epsilon:.4g} is left",
                status=403)
        return outcome

    def report(self, project: str, delta: float) -> float:
        """The tighter PLD figure for people (slower; not used for gating)."""
        from privacy import event_from_dict

        events = [event_from_dict(h.event) for h in self.ledger.history(project, PROJECT_WIDE)
                  if h.accepted]
        return pld_epsilon(events, delta) if events else 0.0
