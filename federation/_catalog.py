"""The federated catalogue: what each node publishes, merged by table name.

A table published by several nodes under one name is the union of their partitions.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

from federation.proto import bulle_pb2 as pb

TIER_RANK = {"open": 0, "restricted": 1, "sensitive": 2}


@dataclass(frozen=True)
class FederatedTable:
    name: str
    tier: str  # strictest across publishing nodes
    columns: dict[str, str]  # columns every publishing node has -> type
    descriptions: dict[str, str]
    nodes: tuple[str, ...]
    row_count_buckets: dict[str, str]
    privacy_unit: str
    public_domains: dict[str, tuple[str, ...]]
    description: str
    min_count: int
    round_to: int
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> its report
    pivots: dict[str, str] = field(default_factory=dict)  # join column -> kind
    # a public reference table: its one node lets the coordinator copy it to the others
    shared: bool = False
    copies: tuple[str, ...] = ()  # nodes holding the current copy (for joins only)
    # declared bounds of a column at every publishing node (their hull): the range its
    # clamped values lie in, for DP checks and post-processing at the coordinator
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    # restricted tier: "person" unless every publishing node declares "institution"
    unit_level: str = "person"
    cell_key: dict[str, Any] = field(default_factory=dict)  # the perturbation's parameters
    # sensitive tier: the most rows one unit keeps, per publishing node (the DP sensitivity)
    max_rows_per_unit: dict[str, int] = field(default_factory=dict)

    @property
    def available_at(self) -> set[str]:
        """Nodes where a plan can read this table: its partitions and current copies."""
        return {*self.nodes, *self.copies}

    def quality_score(self) -> int | None:
        """The lowest score among the publishing nodes (a table is as good as its worst part)."""
        scores = [q["score"] for q in self.quality.values()]
        return min(scores) if scores else None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "tier": self.tier, "description": self.description,
            "nodes": list(self.nodes), "row_count_buckets": self.row_count_buckets,
            "privacy_unit": self.privacy_unit,
            "columns": [{"name": c, "type": t, "description": self.descriptions.get(c, ""),
                         "pivot": self.pivots.get(c)}
                        for c, t in self.columns.items()],
            "public_domains": {k: list(v) for k, v in self.public_domains.items()},
            "min_count": self.min_count, "round_to": self.round_to,
            "quality_score": self.quality_score(), "quality": self.quality,
            "pivots": self.pivots, "shared": self.shared, "copies": list(self.copies),
            "unit_level": self.unit_level, "cell_key": self.cell_key,
            "bounds": {c: list(b) for c, b in self.bounds.items()},
            "max_rows_per_unit": self.max_rows_per_unit,
        }


def quality_json(q: pb.Quality) -> dict[str, Any]:
    """A node's (already coarsened) quality report as JSON."""
    return {
        "score": q.score, "completeness_pct": q.completeness_pct,
        "validity_pct": q.validity_pct if q.HasField("validity_pct") else None,
        "uniqueness_pct": q.uniqueness_pct if q.HasField("uniqueness_pct") else None,
        "uniqueness_in_score": q.uniqueness_in_score,
        "column_completeness_pct": dict(q.column_completeness_pct),
        "checks": [{"column": c.column, "rule": c.rule, "invalid": c.invalid,
                    "valid_pct": c.valid_pct if c.HasField("valid_pct") else None}
                   for c in q.checks],
        "units_bucket": q.units_bucket, "source_modified_at": q.source_modified_at,
        "ingested_at": q.ingested_at, "coarsened": q.coarsened,
    }


def shipped(publishers: list[tuple[str, pb.TableInfo]]) -> bool:
    """A reference table the coordinator copies: one node publishes it, open and shared."""
    return (len(publishers) == 1 and publishers[0][1].shared
            and publishers[0][1].tier == "open")


def federate(catalogs: dict[str, pb.Catalog]) -> dict[str, FederatedTable]:
    """Tables by name. A node's copy of a reference table is not a partition: it only
    makes the table available there for joins (and only while it is the current version)."""
    by_table: dict[str, list[tuple[str, pb.TableInfo]]] = {}
    copies: dict[str, dict[str, str]] = {}  # table -> node -> (origin, sha256) key
    for node_id in sorted(catalogs):
        for t in catalogs[node_id].tables:
            if t.copy_of:
                copies.setdefault(t.name, {})[node_id] = f"{t.copy_of}/{t.content_sha256}"
            else:
                by_table.setdefault(t.name, []).append((node_id, t))
    out = {}
    for name, entries in sorted(by_table.items()):
        first = entries[0][1]
        columns = {c.name: c.type for c in first.columns}
        for _, t in entries[1:]:
            theirs = {c.name for c in t.columns}
            columns = {c: typ for c, typ in columns.items() if c in theirs}
        domains: dict[str, tuple[str, ...]] = {}
        for col in first.public_domains:
            if all(col in t.public_domains for _, t in entries):
                values = [v for _, t in entries for v in t.public_domains[col].values]
                domains[col] = tuple(dict.fromkeys(values))
        bounds = {c: (min(t.bounds[c].lower for _, t in entries),
                      max(t.bounds[c].upper for _, t in entries))
                  for c in first.bounds if c in columns
                  and all(c in t.bounds for _, t in entries)}
        shared = shipped(entries)
        current = f"{entries[0][0]}/{first.content_sha256}"
        out[name] = FederatedTable(
            name=name,
            tier=max((t.tier for _, t in entries), key=TIER_RANK.__getitem__),
            columns=columns,
            descriptions={c.name: c.description for _, t in entries for c in t.columns
                          if c.description},
            nodes=tuple(n for n, _ in entries),
            row_count_buckets={n: t.row_count_bucket for n, t in entries},
            privacy_unit=first.privacy_unit,
            public_domains=domains,
            description=next((t.description for _, t in entries if t.description), ""),
            min_count=max(t.min_count for _, t in entries),
            round_to=max(t.round_to for _, t in entries),
            quality={n: quality_json(t.quality) for n, t in entries if t.HasField("quality")},
            pivots={c: k for _, t in entries for c, k in t.pivots.items() if c in columns},
            shared=shared,
            copies=tuple(n for n, key in copies.get(name, {}).items()
                         if shared and key == current),
            bounds=bounds,
            unit_level=("institution" if all(t.unit_level == "institution" for _, t in entries)
                        else "person"),
            cell_key=_cell_key(entries),
            max_rows_per_unit={n: t.max_rows_per_unit for n, t in entries
                               if t.max_rows_per_unit},
        )
    return out


def _cell_key(entries: list[tuple[str, pb.TableInfo]]) -> dict[str, Any]:
    """The loosest perturbation any publishing node applies (what a researcher can rely on
    is the smallest noise), for restricted tables."""
    keys = [t.cell_key for _, t in entries if t.tier == "restricted" and t.HasField("cell_key")]
    if not keys:
        return {}
    return {"perturbed": all(k.perturbed for k in keys),
            "max_perturbation": min(k.max_perturbation for k in keys),
            "variance": min(k.variance for k in keys),
            "magnitude": min(k.magnitude for k in keys)}


def fold(text: str) -> str:
    """Lower case without accents: what catalogue search compares."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def search_table(table: dict[str, Any], query: str) -> list[str] | None:
    """Where every word of ``query`` occurs in a catalogue entry (``FederatedTable.to_json``):
    its name, description, column names and descriptions, case and accents ignored; None if
    a word occurs nowhere. Shared by ``Hub.catalog(search=…)`` and the catalogue page."""
    places = [("name", table["name"]), ("description", table.get("description") or "")]
    places += [(c["name"], f"{c['name']} {c.get('description') or ''}")
               for c in table.get("columns", [])]
    found: list[str] = []
    for word in fold(query).split():
        hits = [where for where, text in places if word in fold(text)]
        if not hits:
            return None
        found += [h for h in hits if h not in found]
    return found
