"""Node-side check and compilation of a Plan into SQL for the locked DuckDB.

This is the second line of defence: whatever the coordinator accepted, a plan is refused
here unless every table is in this node's catalogue, every operator is allow-listed,
row output only touches `open` tables, and joins follow the node's rules. Refusal
messages are built from the plan's structure and the config, never from data.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlglot import exp

from federation.proto import bulle_pb2 as pb
from federation.proto.ops import ExprError, to_sql
from nodes._dp import DpPartial, DpRefused, DpSpec, clamp, key_domain, partial_bounds, value_bounds

TIER_RANK = {"open": 0, "restricted": 1, "sensitive": 2}
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
MAX_GROUP_KEYS = 8
MAX_AGGREGATES = 64
MAX_JOINS = 3
MAX_DP_CELLS = 100_000


class PlanRefused(ValueError):
    """The node will not run this plan; the message is safe to send to the coordinator."""


@dataclass(frozen=True)
class TableMeta:
    name: str
    tier: str
    columns: dict[str, str]  # name -> DuckDB type
    privacy_unit: str
    public_domains: dict[str, tuple[object, ...]]
    min_count: int
    round_to: int
    dominance: float
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    max_rows_per_unit: int = 1
    max_unit_rows: int = 0  # the most rows any unit has in the loaded data (0: unknown)
    # numeric columns with no negative value in the loaded data (restricted tier): there
    # |v| = v, so the dominance rule reads MAX(v) and the SUM itself
    nonnegative: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CompiledPlan:
    sql: str
    tier: str
    tables: tuple[str, ...]
    is_rows: bool
    group_names: tuple[str, ...]
    # per group key: the declared public domain when the key is a plain column that has one
    key_domains: tuple[tuple[object, ...] | None, ...]
    aggregates: tuple[tuple[str, int], ...]  # (name, AggKind)
    dominance_pairs: tuple[tuple[str, str, str], ...]  # (aggregate, max-abs col, sum-abs col)
    min_count: int
    dominance: float
    round_to: int
    dp: DpSpec | None = None  # set for plans on sensitive data


def _ident(name: str) -> exp.Identifier:
    return exp.to_identifier(name, quoted=True)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise PlanRefused(f"invalid {kind} name in plan")


def compile_plan(plan: pb.Plan, catalog: dict[str, TableMeta], max_rows: int) -> CompiledPlan:
    aliases: dict[str, TableMeta] = {}

    def add_table(ref: pb.TableRef) -> exp.Expression:
        meta = catalog.get(ref.table)
        if meta is None:
            raise PlanRefused(f"table {ref.table[:64]!r} is not published by this node")
        alias = ref.alias or ref.table
        _check_name("alias", alias)
        if alias in aliases:
            raise PlanRefused(f"alias {alias!r} used twice")
        aliases[alias] = meta
        return exp.Table(this=_ident(meta.name), alias=exp.TableAlias(this=_ident(alias)))

    def resolve(table: str, column: str) -> exp.Expression:
        meta = aliases.get(table)
        if meta is None:
            raise ExprError("column refers to an unknown table alias")
        if column not in meta.columns:
            raise ExprError(f"column {column[:64]!r} is not in table {meta.name!r}")
        return exp.Column(this=_ident(column), table=_ident(table))

    def compile_expr(e: pb.Expr) -> exp.Expression:
        try:
            return to_sql(e, resolve)
        except ExprError as err:
            raise PlanRefused(str(err)) from None

    if not plan.HasField("source"):
        raise PlanRefused("plan has no source table")
    if len(plan.joins) > MAX_JOINS:
        raise PlanRefused(f"at most {MAX_JOINS} joins per plan")
    query = exp.select().from_(add_table(plan.source))
    source_alias = plan.source.alias or plan.source.table
    for join in plan.joins:
        if join.kind not in ("inner", "left"):
            raise PlanRefused("only inner and left joins are allowed")
        table_sql = add_table(join.table)
        alias = join.table.alias or join.table.table
        _check_join(join.on, alias, aliases)
        query = query.join(table_sql, on=compile_expr(join.on), join_type=join.kind.upper(),
                           copy=False)
    tier = max((m.tier for m in aliases.values()), key=TIER_RANK.__getitem__)
    if plan.HasField("where"):
        query = query.where(compile_expr(plan.where), copy=False)
    if tier == "sensitive":
        try:
            return _compile_dp(plan, query, aliases, source_alias, compile_expr, resolve)
        except DpRefused as e:
            raise PlanRefused(str(e)) from None
    tables = tuple(sorted({m.name for m in aliases.values()}))
    restricted = [m for m in aliases.values() if m.tier == "restricted"]
    min_count = max((m.min_count for m in restricted), default=0)
    round_to = max((m.round_to for m in restricted), default=1)
    dominance = min((m.dominance for m in restricted), default=1.0)

    if plan.HasField("rows"):
        if tier != "open":
            raise PlanRefused("row-level output is only allowed on open tables; "
                              f"this plan touches {tier} data")
        if plan.group_by or plan.aggregates:
            raise PlanRefused("a row plan has no group keys or aggregates")
        names = []
        for col in plan.rows.columns:
            _check_name("output", col.name)
            names.append(col.name)
            query = query.select(exp.alias_(compile_expr(col.expr), _ident(col.name)), copy=False)
        if not names:
            raise PlanRefused("row plan selects no column")
        for key in plan.rows.order_by:
            if key.name not in names:
                raise PlanRefused("ORDER BY must name an output column")
            query = query.order_by(exp.Ordered(this=exp.column(_ident(key.name)),
                                               desc=key.descending), copy=False)
        limit = plan.rows.limit if 0 < plan.rows.limit <= max_rows else max_rows + 1
        query = query.limit(limit, copy=False)
        return CompiledPlan(query.sql("duckdb"), tier, tables, True, tuple(names), (), (), (),
                            0, 1.0, 1)

    if len(plan.group_by) > MAX_GROUP_KEYS or len(plan.aggregates) > MAX_AGGREGATES:
        raise PlanRefused(f"at most {MAX_GROUP_KEYS} group keys and {MAX_AGGREGATES} aggregates")
    group_names, domains = [], []
    for i, key in enumerate(plan.group_by):
        _check_name("group key", key.name)
        group_names.append(key.name)
        query = query.select(exp.alias_(compile_expr(key.expr), _ident(key.name)), copy=False)
        domains.append(_public_domain(key.expr, aliases))
        query = query.group_by(exp.Literal.number(i + 1), copy=False)
    aggs, dominance_pairs = [], []
    for agg in plan.aggregates:
        _check_name("aggregate", agg.name)
        if agg.kind == pb.COUNT_ROWS:
            value: exp.Expression = exp.Count(this=exp.Star())
        else:
            if not agg.HasField("arg"):
                raise PlanRefused("aggregate without argument")
            arg = compile_expr(agg.arg)
            value = _aggregate_sql(agg.kind, arg)
            if agg.kind == pb.SUM and tier == "restricted" and dominance < 1.0:
                mx = f"__max_abs_{agg.name}"
                if _nonnegative(agg.arg, aliases):
                    query = query.select(exp.alias_(exp.Max(this=arg.copy()), _ident(mx)),
                                         copy=False)
                    dominance_pairs.append((agg.name, mx, agg.name))
                else:
                    sm = f"__sum_abs_{agg.name}"
                    abs_arg = exp.Anonymous(this="abs", expressions=[arg.copy()])
                    query = query.select(exp.alias_(exp.Max(this=abs_arg), _ident(mx)),
                                         copy=False)
                    query = query.select(exp.alias_(exp.Sum(this=abs_arg.copy()), _ident(sm)),
                                         copy=False)
                    dominance_pairs.append((agg.name, mx, sm))
        aggs.append((agg.name, agg.kind))
        query = query.select(exp.alias_(value, _ident(agg.name)), copy=False)
    if tier == "restricted":
        query = query.select(exp.alias_(_units(aliases, bool(plan.joins), resolve),
                                        _ident("__units")), copy=False)
    return CompiledPlan(query.sql("duckdb"), tier, tables, False, tuple(group_names),
                        tuple(domains), tuple(aggs), tuple(dominance_pairs), min_count,
                        dominance, round_to)


def _compile_dp(plan: pb.Plan, query: exp.Select, aliases: dict[str, TableMeta],
                source_alias: str, compile_expr, resolve) -> CompiledPlan:
    """A plan on sensitive data: bounded contributions, keys from public domains."""
    sensitive = {m.name for m in aliases.values() if m.tier == "sensitive"}
    if len(sensitive) > 1:
        raise PlanRefused("a plan may touch one sensitive table (its budget is charged)")
    source = aliases[source_alias]
    if source.tier != "sensitive":
        raise PlanRefused("the sensitive table must be the plan's source (FROM) table")
    if plan.HasField("rows"):
        raise PlanRefused("row-level output is only allowed on open tables")
    if not plan.HasField("privacy") or not plan.privacy.epsilon > 0:
        raise PlanRefused("sensitive data is released only with differential privacy: "
                          "the plan carries no ε")
    if not math.isfinite(plan.privacy.epsilon) or plan.privacy.epsilon > 10:
        raise PlanRefused("ε per query must be finite and at most 10")
    bounds_of = {(a, c): b for a, m in aliases.items() for c, b in m.bounds.items()}
    domains_of = {(a, c): d for a, m in aliases.items() for c, d in m.public_domains.items()}
    inner = query.copy()
    group_names, domains = [], []
    for key in plan.group_by:
        _check_name("group key", key.name)
        domains.append(key_domain(key.expr, domains_of, bounds_of))
        group_names.append(key.name)
        inner = inner.select(exp.alias_(compile_expr(key.expr), _ident(key.name)))
    cells = math.prod(len(d) for d in domains)
    if cells > MAX_DP_CELLS:
        raise PlanRefused(f"the public domains of the group keys make {cells} cells "
                          f"(at most {MAX_DP_CELLS})")
    if not plan.aggregates or len(plan.aggregates) > MAX_AGGREGATES:
        raise PlanRefused(f"a DP plan has 1 to {MAX_AGGREGATES} aggregates")
    partials, outer_aggs = [], []
    for i, agg in enumerate(plan.aggregates):
        _check_name("aggregate", agg.name)
        col = f"__a{i}"
        if agg.kind == pb.COUNT_ROWS:
            lo, hi = partial_bounds(agg.kind, None, agg.name)
            value: exp.Expression = exp.Count(this=exp.Star())
        else:
            if not agg.HasField("arg"):
                raise PlanRefused("aggregate without argument")
            arg_bounds = value_bounds(agg.arg, bounds_of)
            lo, hi = partial_bounds(agg.kind, arg_bounds, agg.name)
            arg = compile_expr(agg.arg)
            if agg.kind in (pb.SUM, pb.SUM_SQUARES):
                arg = clamp(arg, *arg_bounds)
            inner = inner.select(exp.alias_(arg, _ident(col)))
            ref = exp.column(_ident(col))
            value = exp.Count(this=ref) if agg.kind == pb.COUNT else _aggregate_sql(agg.kind, ref)
        partials.append(DpPartial(agg.name, agg.kind, lo, hi))
        outer_aggs.append(exp.alias_(value, _ident(agg.name)))
    outer = exp.select(*[exp.column(_ident(g)) for g in group_names], *outer_aggs)
    # Each unit keeps at most max_rows_per_unit rows, picked at random. The per-unit rank is
    # a full sort (0.4–1.2 s per 3M rows), so it is skipped when the node knows from load
    # time that no unit has more rows than that and no join can multiply them (a WHERE
    # only removes rows).
    if plan.joins or not 0 < source.max_unit_rows <= source.max_rows_per_unit:
        unit = resolve(source_alias, source.privacy_unit)
        # DuckDB refuses volatile window orders: rank by a hash of row id and a fresh salt
        salt = exp.Literal.number(secrets.randbits(62))
        rank = exp.Anonymous(this="hash", expressions=[
            exp.Column(this=exp.to_identifier("rowid"), table=_ident(source_alias)), salt])
        rn = exp.Window(this=exp.RowNumber(), partition_by=[unit],
                        order=exp.Order(expressions=[exp.Ordered(this=rank)]))
        inner = inner.select(exp.alias_(rn, _ident("__rn")), copy=False)
        outer = outer.where(exp.LTE(this=exp.column(_ident("__rn")),
                                    expression=exp.Literal.number(source.max_rows_per_unit)),
                            copy=False)
    if not inner.expressions:  # COUNT(*) with no keys and no window selects nothing else
        inner = inner.select(exp.alias_(exp.Literal.number(1), _ident("__one")), copy=False)
    outer = outer.from_(exp.Subquery(this=inner, alias=exp.TableAlias(this=_ident("__bounded"))),
                        copy=False)
    for i in range(len(group_names)):
        outer = outer.group_by(exp.Literal.number(i + 1))
    spec = DpSpec(plan.privacy.epsilon, plan.privacy.delta, source.max_rows_per_unit,
                  tuple(partials), tuple(domains), source.name)
    return CompiledPlan(outer.sql("duckdb"), "sensitive", tuple(sorted(m.name for m in
                        aliases.values())), False, tuple(group_names), tuple(domains),
                        tuple((p.name, p.kind) for p in partials), (), 0, 1.0, 1, spec)


def _aggregate_sql(kind: int, arg: exp.Expression) -> exp.Expression:
    if kind == pb.COUNT:
        return exp.Count(this=arg)
    if kind == pb.SUM:
        return exp.Sum(this=arg)
    if kind == pb.SUM_SQUARES:
        return exp.Sum(this=exp.Mul(this=exp.paren(arg), expression=exp.paren(arg.copy())))
    if kind == pb.MIN:
        return exp.Min(this=arg)
    if kind == pb.MAX:
        return exp.Max(this=arg)
    raise PlanRefused("unknown aggregate kind")


def _units(aliases: dict[str, TableMeta], joined: bool,
           resolve: Callable[[str, str], exp.Expression]) -> exp.Expression:
    """The units a cell draws on: for every restricted table, its distinct privacy units
    (its distinct rows when it declares none), and the smallest of these counts.

    Joined rows are not units: a join may repeat a unit's rows (a reference table with
    several rows per key, the restricted table on either side), and a LEFT JOIN adds
    null-extended rows that belong to nobody; COUNT(DISTINCT …) ignores both.
    """
    counts: list[exp.Expression] = []
    for alias, meta in aliases.items():
        if meta.tier != "restricted":
            continue
        if meta.privacy_unit:
            key = resolve(alias, meta.privacy_unit)
        elif not joined:
            counts.append(exp.Count(this=exp.Star()))  # one table: each row is its own unit
            continue
        else:
            key = exp.Column(this=exp.to_identifier("rowid"), table=_ident(alias))
        counts.append(exp.Count(this=exp.Distinct(expressions=[key])))
    return counts[0] if len(counts) == 1 else exp.Least(this=counts[0],
                                                        expressions=counts[1:])


def _nonnegative(e: pb.Expr, aliases: dict[str, TableMeta]) -> bool:
    """A plain column known to hold no negative value (a WHERE or join only drops rows)."""
    if e.WhichOneof("kind") != "column":
        return False
    meta = aliases.get(e.column.table)
    return meta is not None and e.column.name in meta.nonnegative


def _public_domain(e: pb.Expr, aliases: dict[str, TableMeta]) -> tuple[object, ...] | None:
    if e.WhichOneof("kind") != "column":
        return None
    meta = aliases.get(e.column.table)
    return meta.public_domains.get(e.column.name) if meta else None


def _check_join(on: pb.Expr, alias: str, aliases: dict[str, TableMeta]) -> None:
    """Joins are equalities between columns; a non-open pair must link privacy units."""
    pairs: list[tuple[pb.ColumnRef, pb.ColumnRef]] = []

    def collect(e: pb.Expr) -> None:
        if e.WhichOneof("kind") == "call" and e.call.op == "and":
            for a in e.call.args:
                collect(a)
            return
        if (e.WhichOneof("kind") == "call" and e.call.op == "eq"
                and all(a.WhichOneof("kind") == "column" for a in e.call.args)):
            pairs.append((e.call.args[0].column, e.call.args[1].column))
            return
        raise PlanRefused("join conditions must be equalities between columns, joined by AND")

    collect(on)
    joined = aliases[alias]
    others = {p.table for pair in pairs for p in pair} - {alias}
    if not others or any(o not in aliases for o in others):
        raise PlanRefused("join condition must link the joined table to a previous one")
    if joined.tier == "open" or all(aliases[o].tier == "open" for o in others):
        return
    for a, b in pairs:
        ta, tb = aliases.get(a.table), aliases.get(b.table)
        if (ta and tb and a.table != b.table and ta.privacy_unit and tb.privacy_unit
                and a.name == ta.privacy_unit and b.name == tb.privacy_unit):
            return
    raise PlanRefused(
        f"joining {joined.name!r} is allowed on the privacy unit "
        f"({joined.privacy_unit or 'none declared'}) or with an open reference table only"
    )
