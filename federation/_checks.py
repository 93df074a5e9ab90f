"""The coordinator's static checks on a parsed query: ordered rules over the frozen tree.

Each rule takes the query and the federated catalogue and raises a ``QueryError`` saying
what is not allowed and why; none reads data, so a refused query costs nothing and no node
ever sees it. They run in :data:`RULES` order (sqlglot's optimizer style: one rule a
function, each testable on plain data). The nodes check every plan again (nodes/_compile.py).
The sensitive tier's own shape rules are in ``federation/_dp_rules.py`` (they run after the
grant check, so that a missing grant is reported first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from federation._catalog import TIER_RANK, FederatedTable
from federation._errors import QueryError
from federation._tree import Agg, Query, walk


@dataclass(frozen=True)
class Checked:
    """A query with its catalogue entries, and where it can run."""

    query: Query
    catalog: dict[str, FederatedTable]

    @cached_property
    def tables(self) -> list[FederatedTable]:
        return [self.catalog[t] for t in self.query.tables]

    @cached_property
    def tier(self) -> str:
        return max((t.tier for t in self.tables), key=TIER_RANK.__getitem__)

    @cached_property
    def participants(self) -> tuple[list[str], list[str]]:
        """Nodes that run the plan, and nodes with data for it that cannot (a joined table
        missing there). Reference tables are read wherever a copy is, but only their origin
        holds their rows: a query counts each row once."""
        facts = [t for t in self.tables if not t.shared] or self.tables[:1]
        lookups = [t for t in self.tables if t not in facts]
        holders = set.union(*(set(t.nodes) for t in facts))
        nodes = set.intersection(*(set(t.nodes) for t in facts),
                                 *(t.available_at for t in lookups))
        return sorted(nodes), sorted(holders - nodes)


Rule = Callable[[Checked], None]


def rows_only_from_open_tables(c: Checked) -> None:
    if not c.query.is_aggregate and c.tier != "open":
        raise QueryError("not_allowed", "row-level output is only allowed on open tables; "
                         f"{', '.join(t.name for t in c.tables if t.tier != 'open')} "
                         "must be aggregated (COUNT, SUM, AVG, …) with GROUP BY")


def no_order_statistics_of_persons(c: Checked) -> None:
    """MIN/MAX of person-level restricted data is one person's value."""
    persons = [t.name for t in c.tables if t.tier == "restricted" and t.unit_level == "person"]
    if not persons:
        return
    q = c.query
    exprs = [i.expr for i in q.items] + [q.having] + [o.expr for o in q.order_by]
    found = sorted({e.func.upper() for x in exprs for e in walk(x)
                    if isinstance(e, Agg) and e.func in ("min", "max")})
    if found:
        raise QueryError(
            "not_allowed", f"{' and '.join(found)} of {', '.join(persons)} would release one "
            "person's value: order statistics are not released on restricted tables whose "
            "unit is a person (DP quantiles are in the sensitive tier)")


def joins_inside_one_node(c: Checked) -> None:
    nodes, _ = c.participants
    if not nodes:
        raise QueryError("not_allowed", f"no node holds all of {', '.join(c.query.tables)}: "
                         "row-level joins across nodes are not allowed")


def no_left_join_from_a_reference(c: Checked) -> None:
    """``reference LEFT JOIN partitioned`` would keep the reference's unmatched rows at
    every node that runs it, so they would be counted once per node."""
    if len(c.participants[0]) <= 1 or all(t.shared for t in c.tables):
        return  # one node, or only reference tables: the plan runs once
    query = c.query
    seen_fact = not c.catalog[query.source.table].shared
    for join in query.joins:
        table = c.catalog[join.table.table]
        if not table.shared and join.kind == "left" and not seen_fact:
            raise QueryError(
                "not_allowed", f"{table.name!r} is split over several nodes: a LEFT JOIN "
                f"from the reference table {query.source.table!r} would repeat its unmatched "
                f"rows at each node. Put {table.name!r} first (FROM {table.name} … LEFT JOIN "
                f"{query.source.table}) or use an inner JOIN")
        seen_fact = seen_fact or not table.shared


RULES: tuple[Rule, ...] = (
    rows_only_from_open_tables,
    no_order_statistics_of_persons,
    joins_inside_one_node,
    no_left_join_from_a_reference,
)


def check(query: Query, catalog: dict[str, FederatedTable]) -> Checked:
    """Run every rule in order; the first refusal is raised."""
    checked = Checked(query, catalog)
    for rule in RULES:
        rule(checked)
    return checked
