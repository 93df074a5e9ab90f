"""Projects at the coordinator: their signed grants, the global ledger and the audit chain.

The coordinator's ledger is per project across the whole federation (one budget scope
``*``): the same pupil may be at a regional node and at a vendor node, so each node's own
per-dataset ledger cannot see the whole spend. A query's ε is reserved here after the
coordinator's static checks and *before* any node receives the plan: a query that does not
fit never runs anywhere, and a query that fails at a node afterwards keeps its charge (a
free failure would be an oracle on the data). Charges are never refunded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dp_accounting as dpa

from federation._config import CoordinatorConfig, ProjectConfig, Researcher
from federation._errors import QueryError
from federation._registry import Project, Registry, RegistryError
from privacy import (
    PROJECT_WIDE,
    AuditLog,
    Grant,
    GrantError,
    Ledger,
    pld_epsilon,
    sign_grant,
    verify_grant,
)


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
        # Projects submitted through the API live in the same database as the ledger.
        self.registry = Registry(config.database_url or str(state / "ledger.sqlite"))
        self.audit = AuditLog(state / "audit.sqlite")
        self.board_key = config.board_public_key.read_bytes() \
            if config.board_public_key else None
        self.board_private_key = config.board_private_key.read_bytes() \
            if config.board_private_key else None
        self.configs = {p.name: p for p in config.projects}
        self.tokens: dict[str, str] = {}
        self._budgets: dict[str, tuple[float, float]] = {}  # caps already in the ledger
        for p in config.projects:
            if p.grant is not None:
                self.tokens[p.name] = p.grant.read_text().strip()

    def config(self, project: str) -> ProjectConfig:
        return self.configs.get(project) or ProjectConfig(project)

    def grant(self, project: str) -> tuple[Grant, str]:
        # Grants from the config's files first, then projects the board approved here.
        token = self.tokens.get(project) or self.registry.active_grant(project)
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
        self.audit.append("coordinator", project, "charged", {
            "query": query_id, "epsilon": epsilon, "replay": outcome.replay,
            "composed_epsilon_before": outcome.spent_epsilon - outcome.needed_epsilon,
            "composed_epsilon_after": outcome.spent_epsilon})
        return outcome

    def report(self, project: str, delta: float) -> float:
        """The tighter PLD figure for people (slower; not used for gating)."""
        from privacy import event_from_dict

        events = [event_from_dict(h.event) for h in self.ledger.history(project, PROJECT_WIDE)
                  if h.accepted]
        return pld_epsilon(events, delta) if events else 0.0

    # -- the board's decisions on registry projects ----------------------------------------
    def approve(self, name: str, actor: str, *, epsilon: float | None = None,
                delta: float | None = None, datasets: list[str] | None = None,
                days: float | None = None, reason: str = "", grant: str | None = None
                ) -> Project:
        """Approve (or amend) a project: sign its grant with the board key held here (demo),
        or record a grant the board signed elsewhere (``grant``, production)."""
        p = self.registry.get(name)
        if p is None:
            raise RegistryError(f"no project {name!r}", status=404)
        if grant is not None:
            if self.board_key is None:
                raise RegistryError("no board public key configured", status=409)
            try:
                g = verify_grant(grant.strip(), self.board_key, datetime.now(UTC))
            except GrantError as e:
                raise RegistryError(f"the uploaded grant is not valid ({e.code})") from None
            if g.project != name:
                raise RegistryError(f"the uploaded grant is for project {g.project!r}")
            token = grant.strip()
        else:
            if self.board_private_key is None:
                raise RegistryError("the board key is not held by this coordinator: sign "
                                    "the grant with `bulle board grant` and upload it",
                                    status=409)
            now = datetime.now(UTC)
            g = Grant(name, p.team, tuple(sorted(datasets or p.datasets)),
                      float(epsilon if epsilon is not None else p.epsilon),
                      float(delta if delta is not None else p.delta),
                      now + timedelta(days=days if days is not None else p.duration_days),
                      p.purpose, now)
            token = sign_grant(g, self.board_private_key)
        amended = (g.epsilon, g.delta, tuple(sorted(g.datasets))) != \
            (p.epsilon, p.delta, tuple(sorted(p.datasets))) or days is not None
        out = self.registry.approve(name, actor, token=token, datasets=g.datasets,
                                    epsilon=g.epsilon, delta=g.delta, expires=g.expires,
                                    reason=reason, amended=amended)
        self.ledger.set_budget(name, PROJECT_WIDE, g.epsilon, g.delta)
        self.audit.append(actor, name, "project_amended" if amended else "project_approved",
                          {"epsilon": g.epsilon, "delta": g.delta, "datasets": list(g.datasets),
                           "expires": g.expires.isoformat()})
        return out

    def refuse(self, name: str, actor: str, reason: str) -> Project:
        out = self.registry.refuse(name, actor, reason)
        self.audit.append(actor, name, "project_refused", {"reason": reason[:500]})
        return out

    def spend(self, project: str) -> tuple[float, float] | None:
        """(ε spent, δ) in the global ledger, or None if the project never had a budget."""
        from privacy import LedgerError

        try:
            return self.ledger.spent(project, PROJECT_WIDE)
        except LedgerError:
            return None
