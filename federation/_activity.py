"""What the board reads about releases, from the coordinator's audit chain: every query
(released, refused or failed, with its SQL text, id and hash), every training run (the
submitted spec, each released round, the final model or why it stopped), each with the ε
charged and how much the project's composed total grew; the ε figures per project that the
legend shows (the same numbers as ``hub.budget()`` and the CSV exports); the audit entries,
paged.

Only metadata leaves here: texts, ids, hashes, ε, node names, times, codes. Nothing a node
computed from rows (released values stay with the researcher).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privacy import AuditEntry

if TYPE_CHECKING:
    from federation._coordinator import Coordinator

QUERY_ACTIONS = {"released": "released", "refused": "refused", "error": "failed"}
ROUND_ACTIONS = {"train_round_released": "round", "train_eval_released": "evaluation"}
FILTERS = ("project", "researcher", "tier", "decision", "kind")
DECISIONS = ("released", "refused", "failed", "submitted")
PAGE_SIZE = 50


@dataclass
class Row:
    """One release or refusal, as the board lists it."""

    seq: int
    time: str
    kind: str  # query | training | training round | final model
    decision: str  # released | refused | failed | submitted
    project: str
    researcher: str
    id: str
    text: str  # the SQL, or the model spec
    hash: str
    tier: str = ""
    epsilon: float = 0.0  # the ε charged (what the query or round reserved)
    composed_before: float | None = None  # the project's composed ε before the charge
    composed_after: float | None = None  # … and after: the growth is not the charge
    nodes: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    rows: int | None = None
    precision: float | None = None
    reason: str = ""

    @property
    def growth(self) -> float | None:
        if self.composed_after is None or self.composed_before is None:
            return None
        return self.composed_after - self.composed_before

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(nodes=list(self.nodes), datasets=list(self.datasets),
                   epsilon=round(self.epsilon, 6), growth=_r6(self.growth),
                   composed_before=_r6(self.composed_before),
                   composed_after=_r6(self.composed_after), researcher=self.researcher)
        return out


def _r6(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def _charges(entries: Iterable[AuditEntry]) -> dict[str, dict[str, Any]]:
    """The ledger's ``charged`` entries by request id (query id, ``train:job:round``)."""
    return {str(e.detail.get("query")): e.detail for e in entries if e.action == "charged"}


def rows(coordinator: Coordinator) -> list[Row]:
    """Every release and refusal, oldest first."""
    entries = list(coordinator.projects.audit.entries())
    charged = _charges(entries)
    specs: dict[str, Row] = {}
    out: list[Row] = []
    for e in entries:
        row = _query_row(e) if e.action in QUERY_ACTIONS else _training_row(e, specs)
        if row is None:
            continue
        c = charged.get(row.id if row.kind == "query" else f"train:{row.id}")
        if c is not None:
            row.composed_before = float(c.get("composed_epsilon_before") or 0.0)
            row.composed_after = float(c.get("composed_epsilon_after") or 0.0)
            if row.kind.startswith("training "):  # the round's claim, as for a query
                row.epsilon = float(c.get("epsilon") or row.epsilon)
        out.append(row)
    return out


def _query_row(e: AuditEntry) -> Row:
    d = e.detail
    reason = f"{d['code']}: {d.get('message', '')}" if d.get("code") else \
        (f"internal error (incident {d['incident']})" if d.get("incident") else "")
    return Row(e.seq, e.time, "query", QUERY_ACTIONS[e.action], e.project, e.actor,
               str(d.get("query", "")), str(d.get("sql", "")), str(d.get("sql_sha256", "")),
               tier=str(d.get("tier", "")), epsilon=float(d.get("epsilon") or 0.0),
               nodes=tuple(d.get("nodes", ())), datasets=tuple(d.get("datasets", ())),
               rows=d.get("rows"), precision=d.get("precision"), reason=reason)


def _training_row(e: AuditEntry, specs: dict[str, Row]) -> Row | None:
    d, job = e.detail, str(e.detail.get("job", ""))
    if e.action == "train_submitted":
        text = (f"{d.get('model')} on {d.get('table')}, {d.get('rounds')} round(s), "
                f"ε target {d.get('epsilon')} per node")
        specs[job] = Row(e.seq, e.time, "training", "submitted", e.project, e.actor, job,
                         text, str(d.get("spec_sha256", "")), tier="sensitive",
                         nodes=tuple(d.get("nodes", ())), datasets=(str(d.get("table")),))
        return specs[job]
    spec = specs.get(job)
    if spec is None or not e.action.startswith("train_"):
        return None
    if e.action in ROUND_ACTIONS:
        return Row(e.seq, e.time, f"training {ROUND_ACTIONS[e.action]}", "released",
                   e.project, e.actor, f"{job}:{d.get('round')}", spec.text, spec.hash,
                   tier="sensitive", epsilon=float(d.get("epsilon") or 0.0),
                   nodes=tuple(d.get("nodes", ())), datasets=spec.datasets)
    status = e.action.removeprefix("train_")
    return Row(e.seq, e.time, "final model", "released" if status == "done" else "refused",
               e.project, e.actor, job, spec.text, spec.hash, tier="sensitive",
               nodes=spec.nodes, datasets=spec.datasets,
               reason="" if status == "done" else f"{status}: {d.get('reason', '')}")


def choices(all_rows: list[Row]) -> dict[str, list[str]]:
    """The values each filter can take (for the form's selects)."""
    return {"project": sorted({r.project for r in all_rows if r.project}),
            "researcher": sorted({r.researcher for r in all_rows}),
            "tier": sorted({r.tier for r in all_rows if r.tier}),
            "decision": [d for d in DECISIONS if any(r.decision == d for r in all_rows)],
            "kind": sorted({r.kind for r in all_rows})}


def select(all_rows: list[Row], wanted: dict[str, str]) -> list[Row]:
    """The rows matching every non-empty filter."""
    keep = {k: v for k, v in wanted.items() if k in FILTERS and v}
    return [r for r in all_rows if all(getattr(r, k) == v for k, v in keep.items())]


def legend(projects: list[dict[str, Any]], all_rows: list[Row]) -> list[dict[str, Any]]:
    """Per project with a budget: ε granted, the composed total (what ``hub.budget()`` says
    and what gates), what is left, and the plain sum of the charges (an upper bound)."""
    out = []
    for p in projects:
        granted = p.get("granted_epsilon")
        if granted is None:
            continue
        charges = sum(r.epsilon for r in all_rows if r.project == p["name"])
        spent = float(p["epsilon_spent"])
        out.append({"project": p["name"], "granted": granted, "spent": round(spent, 6),
                    "remaining": round(max(granted - spent, 0.0), 6),
                    "charges": round(charges, 6)})
    return out


def composed_by_dataset(coordinator: Coordinator, all_rows: list[Row]
                        ) -> dict[tuple[str, str], float]:
    """(project, dataset) → the composition of the project's accepted charges whose release
    read that dataset, with the ledger's own maths (RDP at the project's δ): the bars then
    compose like the project's total, and none exceeds it."""
    from privacy import PROJECT_WIDE, LedgerError, event_from_dict, rdp_epsilon

    reads: dict[str, tuple[str, ...]] = {}  # ledger request id (or training job) → datasets
    for r in all_rows:
        if r.kind == "query":
            reads[r.id] = r.datasets
        elif r.kind == "training":
            reads[f"train:{r.id}"] = r.datasets
    out: dict[tuple[str, str], float] = {}
    ledger = coordinator.projects.ledger
    for project in sorted({r.project for r in all_rows if r.project}):
        try:
            _, delta = ledger.spent(project, PROJECT_WIDE)
            history = ledger.history(project, PROJECT_WIDE)
        except LedgerError:
            continue
        events: dict[str, list[Any]] = {}
        seen: set[str] = set()
        for h in history:
            if not h.accepted or h.request_id in seen:  # a replay charged nothing more
                continue
            seen.add(h.request_id)
            job = ":".join(h.request_id.split(":")[:2])  # train:<job>:<round or plan>
            for d in reads.get(h.request_id, reads.get(job, ())):
                events.setdefault(d, []).append(event_from_dict(h.event))
        for d, evs in events.items():
            out[(project, d)] = rdp_epsilon(evs, delta)
    return out


def audit_page(coordinator: Coordinator, page: int, project: str = "",
               action: str = "") -> dict[str, Any]:
    """One page of the coordinator's audit entries, newest first."""
    entries = [e for e in coordinator.projects.audit.entries(project or None)
               if not action or e.action == action]
    pages = max(1, -(-len(entries) // PAGE_SIZE))
    page = min(max(page, 1), pages)
    end = len(entries) - (page - 1) * PAGE_SIZE
    shown = entries[max(0, end - PAGE_SIZE):end][::-1]
    return {"entries": shown, "page": page, "pages": pages, "total": len(entries),
            "actions": sorted({e.action for e in coordinator.projects.audit.entries()})}
