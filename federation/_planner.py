"""Rewrite a query tree into one per-node plan of partial aggregates and a merge.

Each aggregate is split into partials that add up across nodes:
COUNT → count; SUM → sum; AVG → sum, count; VAR/STDDEV → sum, sum of squares, count;
MIN/MAX → min/max. The merge sums (or min/max-es) partials per group, then computes the
final expressions, HAVING, ORDER BY and LIMIT on released values only.
"""

from __future__ import annotations

from dataclasses import dataclass

import dp_accounting as dpa

from federation._tree import Agg, Call, Col, Expr, Lit, Query, to_proto, walk
from federation.proto import bulle_pb2 as pb
from privacy import laplace_event

_PARTS = {
    "count": ("count",), "sum": ("sum",), "avg": ("sum", "count"),
    "var_samp": ("sum", "sumsq", "count"), "var_pop": ("sum", "sumsq", "count"),
    "stddev_samp": ("sum", "sumsq", "count"), "stddev_pop": ("sum", "sumsq", "count"),
    "min": ("min",), "max": ("max",),
}
_KIND = {"count": pb.COUNT, "sum": pb.SUM, "sumsq": pb.SUM_SQUARES, "min": pb.MIN,
         "max": pb.MAX}
MERGE_FN = {pb.COUNT_ROWS: "sum", pb.COUNT: "sum", pb.SUM: "sum", pb.SUM_SQUARES: "sum",
            pb.MIN: "min", pb.MAX: "max"}
M = "m"  # alias of the merged partials in the merge SQL


@dataclass(frozen=True)
class Partial:
    name: str
    kind: int  # pb.AggKind
    arg: Expr | None


@dataclass(frozen=True)
class FederatedPlan:
    query: Query
    plan: pb.Plan  # request fields (id, project, …) are filled per request
    partials: tuple[Partial, ...]
    group_names: tuple[str, ...]
    roles: dict[Agg, dict[str, str]]  # aggregate -> role ("sum", "count", …) -> partial

    @property
    def is_rows(self) -> bool:
        return self.plan.HasField("rows")


def plan_query(q: Query) -> FederatedPlan:
    plan = pb.Plan(source=pb.TableRef(table=q.source.table, alias=q.source.alias))
    for j in q.joins:
        plan.joins.add(table=pb.TableRef(table=j.table.table, alias=j.table.alias),
                       kind=j.kind, on=to_proto(j.on))
    if q.where is not None:
        plan.where.CopyFrom(to_proto(q.where))
    if not q.is_aggregate:
        plan.rows.SetInParent()
        # positional names on the wire (c0, c1, …): the merge restores the researcher's
        names = [i.name for i in q.items]
        for i, item in enumerate(q.items):
            plan.rows.columns.add(name=f"c{i}", expr=to_proto(item.expr))
        for o in q.order_by:
            plan.rows.order_by.add(name=f"c{names.index(o.expr.name)}", descending=o.descending)
        if q.limit is not None:
            plan.rows.limit = max(q.limit, 0) or 1
        return FederatedPlan(q, plan, (), (), {})

    group_names = tuple(f"g{i}" for i in range(len(q.group_by)))
    for name, key in zip(group_names, q.group_by, strict=True):
        plan.group_by.add(name=name, expr=to_proto(key))
    partials: dict[tuple[int, Expr | None], Partial] = {}
    roles: dict[Agg, dict[str, str]] = {}
    exprs = [i.expr for i in q.items] + [q.having] + [o.expr for o in q.order_by]
    for e in exprs:
        for node in walk(e):
            if not isinstance(node, Agg) or node in roles:
                continue
            roles[node] = {}
            for role in _PARTS[node.func]:
                kind = pb.COUNT_ROWS if node.arg is None else _KIND[role]
                key = (kind, node.arg)
                if key not in partials:
                    partials[key] = Partial(f"p{len(partials)}", kind, node.arg)
                roles[node][role] = partials[key].name
    for p in partials.values():
        agg = plan.aggregates.add(name=p.name, kind=p.kind)
        if p.arg is not None:
            agg.arg.CopyFrom(to_proto(p.arg))
    return FederatedPlan(q, plan, tuple(partials.values()), group_names, roles)


def plan_event(epsilon: float, n_partials: int) -> dpa.DpEvent:
    """What one node's DP release of a plan costs: ε split equally over its partials
    (the same event the node charges, nodes/_dp.py)."""
    return dpa.ComposedDpEvent([laplace_event(epsilon / n_partials)] * n_partials)


def merged_form(agg: Agg, roles: dict[str, str], round_to: int) -> Expr:
    """The final value of ``agg`` over the merged partials (table alias ``m``)."""
    col = {role: Col(M, name) for role, name in roles.items()}
    if agg.func == "count":
        c = col["count"]
        if round_to > 1:  # presentation rounding, half up, on released counts
            half = Lit(round_to // 2)
            c = Call("mul", (Call("floor", (Call("div", (Call("add", (c, half)),
                                                          Lit(round_to))),)), Lit(round_to)))
            c = Call("cast", (c, Lit("BIGINT")))
        return c
    if agg.func in ("sum", "min", "max"):
        return col[agg.func]
    n = Call("nullif", (Call("cast", (col["count"], Lit("DOUBLE"))), Lit(0)))
    mean = Call("div", (Call("cast", (col["sum"], Lit("DOUBLE"))), n))
    if agg.func == "avg":
        return mean
    # sum of squared deviations = Σx² − (Σx)²/n, clamped at 0 against rounding error
    ss = Call("greatest", (Call("sub", (Call("cast", (col["sumsq"], Lit("DOUBLE"))),
                                        Call("mul", (mean, Call("cast", (col["sum"],
                                                                         Lit("DOUBLE"))))))),
                           Lit(0.0)))
    denom = n if agg.func.endswith("_pop") else Call("nullif", (Call("sub", (n, Lit(1))), Lit(0)))
    var = Call("div", (ss, denom))
    return Call("sqrt", (var,)) if agg.func.startswith("stddev") else var
