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
from federation.proto.ops import column as typed_column
from nodes._config import ROW_UNIT
from nodes._dp import DpPartial, DpRefused, DpSpec, clamp, key_domain, partial_bounds, value_bounds
from nodes._restricted import (
    MAX_GROUPS,
    RECORD_KEY,
    RestrictedAgg,
    RestrictedRelease,
    contribution_bounds,
    is_indicator,
    restricted_sql,
)
from nodes._sources import type_family
from privacy import CkmParams

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
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    max_rows_per_unit: int = 1
    max_unit_rows: int = 0  # the most rows any unit has in the loaded data (0: unknown)
    # restricted tier: "person" (no order statistics) or "institution" (a school is the unit)
    unit_level: str = "person"
    ckm: CkmParams = field(default_factory=CkmParams)
    perturb: bool = True  # False only where the node allows exact releases (tests)


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
    min_count: int
    round_to: int
    dp: DpSpec | None = None  # set for plans on sensitive data
    restricted: RestrictedRelease | None = None  # set for aggregates of restricted data


def _ident(name: str) -> exp.Identifier:
    return exp.to_identifier(name, quoted=True)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise PlanRefused(f"invalid {kind} name in plan")


class _Scope:
    """The plan's tables by alias, and expression compilation against them."""

    def __init__(self, catalog: dict[str, TableMeta]) -> None:
        self.catalog = catalog
        self.aliases: dict[str, TableMeta] = {}

    def add_table(self, ref: pb.TableRef) -> exp.Expression:
        meta = self.catalog.get(ref.table)
        if meta is None:
            raise PlanRefused(f"table {ref.table[:64]!r} is not published by this node")
        alias = ref.alias or ref.table
        _check_name("alias", alias)
        if alias in self.aliases:
            raise PlanRefused(f"alias {alias!r} used twice")
        self.aliases[alias] = meta
        return exp.Table(this=_ident(meta.name), alias=exp.TableAlias(this=_ident(alias)))

    def resolve(self, table: str, column: str) -> exp.Expression:
        meta = self.aliases.get(table)
        if meta is None:
            raise ExprError("column refers to an unknown table alias")
        if column not in meta.columns:
            raise ExprError(f"column {column[:64]!r} is not in table {meta.name!r}")
        # typed: comparisons of same-typed operands then compile without TRY (ops.py)
        return typed_column(table, column, meta.columns[column])

    def compile_expr(self, e: pb.Expr, condition: bool = False) -> exp.Expression:
        try:
            return to_sql(e, self.resolve, condition=condition)
        except ExprError as err:
            raise PlanRefused(str(err)) from None

    @property
    def tier(self) -> str:
        return max((m.tier for m in self.aliases.values()), key=TIER_RANK.__getitem__)

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(sorted({m.name for m in self.aliases.values()}))


def compile_plan(plan: pb.Plan, catalog: dict[str, TableMeta], max_rows: int) -> CompiledPlan:
    scope = _Scope(catalog)
    query = _compile_source(plan, scope)
    tier = scope.tier
    if tier == "sensitive":
        try:
            return _compile_dp(plan, query, scope)
        except DpRefused as e:
            raise PlanRefused(str(e)) from None
    if plan.HasField("rows"):
        return _compile_rows(plan, query, scope, max_rows)
    return _compile_aggregates(plan, query, scope)


def _compile_source(plan: pb.Plan, scope: _Scope) -> exp.Select:
    """FROM, the joins (checked against the node's rules) and WHERE."""
    if not plan.HasField("source"):
        raise PlanRefused("plan has no source table")
    if len(plan.joins) > MAX_JOINS:
        raise PlanRefused(f"at most {MAX_JOINS} joins per plan")
    query = exp.select().from_(scope.add_table(plan.source))
    for join in plan.joins:
        if join.kind not in ("inner", "left"):
            raise PlanRefused("only inner and left joins are allowed")
        table_sql = scope.add_table(join.table)
        alias = join.table.alias or join.table.table
        _check_join(join.on, alias, scope.aliases)
        query = query.join(table_sql, on=scope.compile_expr(join.on),
                           join_type=join.kind.upper(), copy=False)
    if plan.HasField("where"):
        query = query.where(scope.compile_expr(plan.where, condition=True), copy=False)
    return query


def _compile_rows(plan: pb.Plan, query: exp.Select, scope: _Scope, max_rows: int
                  ) -> CompiledPlan:
    """Row output: open tables only, output columns, ORDER BY output names, a LIMIT."""
    tier = scope.tier
    if tier != "open":
        raise PlanRefused("row-level output is only allowed on open tables; "
                          f"this plan touches {tier} data")
    if plan.group_by or plan.aggregates:
        raise PlanRefused("a row plan has no group keys or aggregates")
    names = []
    for col in plan.rows.columns:
        _check_name("output", col.name)
        names.append(col.name)
        query = query.select(exp.alias_(scope.compile_expr(col.expr), _ident(col.name)),
                             copy=False)
    if not names:
        raise PlanRefused("row plan selects no column")
    for key in plan.rows.order_by:
        if key.name not in names:
            raise PlanRefused("ORDER BY must name an output column")
        query = query.order_by(exp.Ordered(this=exp.column(_ident(key.name)),
                                           desc=key.descending), copy=False)
    limit = plan.rows.limit if 0 < plan.rows.limit <= max_rows else max_rows + 1
    query = query.limit(limit, copy=False)
    return CompiledPlan(query.sql("duckdb"), tier, scope.tables, True, tuple(names), (), (),
                        0, 1)


def _compile_aggregates(plan: pb.Plan, query: exp.Select, scope: _Scope) -> CompiledPlan:
    """Grouped partial aggregates on open or restricted data."""
    aliases = scope.aliases
    tier = scope.tier
    restricted = [m for m in aliases.values() if m.tier == "restricted"]
    min_count = max((m.min_count for m in restricted), default=0)
    round_to = max((m.round_to for m in restricted), default=1)
    if len(plan.group_by) > MAX_GROUP_KEYS or len(plan.aggregates) > MAX_AGGREGATES:
        raise PlanRefused(f"at most {MAX_GROUP_KEYS} group keys and {MAX_AGGREGATES} aggregates")
    keys: list[tuple[str, exp.Expression]] = []
    domains = []
    for key in plan.group_by:
        _check_name("group key", key.name)
        keys.append((key.name, scope.compile_expr(key.expr)))
        domains.append(_public_domain(key.expr, aliases))
    aggs = [_aggregate_arg(agg, scope) for agg in plan.aggregates]
    group_names = tuple(name for name, _ in keys)
    kinds = tuple((name, kind) for name, kind, _ in aggs)
    if tier == "restricted":
        sql, noise = _restricted_sql(plan, query, aliases, keys, aggs, scope.resolve)
        release = _restricted_release(plan, aliases, group_names, tuple(domains), kinds, noise)
        return CompiledPlan(sql, tier, scope.tables, False, group_names, tuple(domains), kinds,
                            release.params.threshold, round_to, restricted=release)
    for i, (name, value) in enumerate(keys):
        query = query.select(exp.alias_(value, _ident(name)), copy=False)
        query = query.group_by(exp.Literal.number(i + 1), copy=False)
    for name, kind, arg in aggs:
        value = exp.Count(this=exp.Star()) if arg is None else _aggregate_sql(kind, arg)
        query = query.select(exp.alias_(value, _ident(name)), copy=False)
    return CompiledPlan(query.sql("duckdb"), tier, scope.tables, False, group_names,
                        tuple(domains), kinds, min_count, round_to)


def _aggregate_arg(agg: pb.Aggregate, scope: _Scope
                   ) -> tuple[str, int, exp.Expression | None]:
    """(name, kind, compiled argument; None for COUNT(*))."""
    _check_name("aggregate", agg.name)
    if agg.kind == pb.COUNT_ROWS:
        return agg.name, agg.kind, None
    if not agg.HasField("arg"):
        raise PlanRefused("aggregate without argument")
    return agg.name, agg.kind, scope.compile_expr(agg.arg)


def _restricted_release(plan: pb.Plan, aliases: dict[str, TableMeta],
                        group_names: tuple[str, ...],
                        domains: tuple[tuple[object, ...] | None, ...],
                        kinds: tuple[tuple[str, int], ...],
                        noise: tuple[tuple[float, bool], ...]) -> RestrictedRelease:
    """The cell key method's parameters for a plan on restricted data."""
    restricted = [m for m in aliases.values() if m.tier == "restricted"]
    persons = sorted(m.name for m in restricted if m.unit_level != "institution")
    if persons and any(kind in (pb.MIN, pb.MAX) for _, kind in kinds):
        raise PlanRefused(
            f"MIN and MAX are not released on {', '.join(repr(p) for p in persons)}: its unit "
            "is a person, and an order statistic is one person's value (DP quantiles are "
            "in the sensitive tier)")
    if domains and all(d is not None for d in domains):
        cells = math.prod(len(d) for d in domains)  # type: ignore[arg-type]
        if cells > MAX_GROUPS:
            raise PlanRefused(f"the public domains of the group keys make {cells} cells "
                              f"(at most {MAX_GROUPS} per release)")
    unit_meta = restricted[0]  # the first restricted table in the plan gives the unit
    params = CkmParams(
        threshold=max(m.min_count for m in restricted),
        max_perturbation=unit_meta.ckm.max_perturbation, variance=unit_meta.ckm.variance,
        magnitude=max(m.ckm.magnitude for m in restricted), ptable=unit_meta.ckm.ptable)
    return RestrictedRelease(group_names, domains, kinds, params,
                             perturb=any(m.perturb for m in restricted), noise=noise)


def _restricted_sql(plan: pb.Plan, query: exp.Select, aliases: dict[str, TableMeta],
                    keys: list[tuple[str, exp.Expression]],
                    aggs: list[tuple[str, int, exp.Expression | None]],
                    resolve: Callable[[str, str], exp.Expression]
                    ) -> tuple[str, tuple[tuple[float, bool], ...]]:
    """The cell-level SQL, and per aggregate its static noise scale and whether it counts."""
    unit_alias = next(a for a, m in aliases.items() if m.tier == "restricted")
    meta = aliases[unit_alias]
    unit = _unit(unit_alias, meta, resolve)
    record_key = exp.Column(this=_ident(RECORD_KEY), table=_ident(unit_alias))
    # one row per unit and nothing joined: the per-unit step is the identity
    one_row_each = not plan.joins and (not meta.privacy_unit or meta.max_unit_rows == 1)
    source = query.select(exp.Literal.number(1), copy=True).sql("duckdb")
    if not source.startswith("SELECT 1 FROM "):
        raise PlanRefused("plan could not be compiled")
    perturb = any(m.perturb for m in aliases.values() if m.tier == "restricted")
    rows = 1 if one_row_each else max(meta.max_unit_rows, 1)  # rows one unit adds at most
    bounds = {(a, c): b for a, m in aliases.items() for c, b in m.bounds.items()}
    zero_one = frozenset(k for k, (lo, hi) in bounds.items() if lo >= 0 and hi <= 1
                         and type_family(aliases[k[0]].columns[k[1]]) in ("integer", "boolean"))
    compiled = [_restricted_agg(name, kind, arg, pb_agg, bounds, zero_one, rows, perturb)
                for (name, kind, arg), pb_agg in zip(aggs, plan.aggregates, strict=True)]
    sql = restricted_sql(source[len("SELECT 1"):], [(n, e.sql("duckdb")) for n, e in keys],
                         unit.sql("duckdb"), record_key.sql("duckdb"), compiled,
                         per_unit=not one_row_each, keyed=perturb)
    return sql, tuple((a.scale, a.count_like) for a in compiled)


def _restricted_agg(name: str, kind: int, arg: exp.Expression | None, agg: pb.Aggregate,
                    bounds: dict[tuple[str, str], tuple[float, float]],
                    zero_one: frozenset[tuple[str, str]], rows: int,
                    perturb: bool) -> RestrictedAgg:
    """One aggregate of a restricted plan, contribution-bounded: each row's value clamped
    to the argument's static bounds, each unit's total to ``rows`` times them."""
    if kind in (pb.COUNT_ROWS, pb.COUNT):
        return RestrictedAgg(name, kind, None if arg is None else arg.sql("duckdb"),
                             float(rows), True, (0.0, float(rows)) if perturb else None)
    assert arg is not None
    if kind in (pb.MIN, pb.MAX) or not perturb:  # institutions' order statistics; exact tests
        if kind == pb.SUM_SQUARES:
            arg = _square(arg)
        return RestrictedAgg(name, kind, arg.sql("duckdb"), 1.0,
                             kind == pb.SUM and is_indicator(agg.arg, zero_one))
    b = contribution_bounds(agg.arg, bounds)
    if b is None:
        raise PlanRefused(
            f"{name!r}: SUM, AVG and VAR on restricted data take numeric columns, numbers, "
            "CASE/COALESCE, + − × and abs of these (each needs a static bound: declared "
            "`bounds`, or the envelope the node derives)")
    lo, hi = b
    clamped = clamp(arg, lo, hi, keep_type=True)
    if kind == pb.SUM_SQUARES:
        clamped = _square(clamped)
        lo, hi = (0.0 if lo <= 0 <= hi else min(lo * lo, hi * hi)), max(lo * lo, hi * hi)
    count_like = kind == pb.SUM and is_indicator(agg.arg, zero_one)
    return RestrictedAgg(name, kind, clamped.sql("duckdb"),
                         max(abs(lo), abs(hi), 1.0 if count_like else 0.0) * rows, count_like,
                         (min(lo, 0.0) * rows, max(hi, 0.0) * rows))


def _check_dp(plan: pb.Plan, aliases: dict[str, TableMeta], source: TableMeta) -> None:
    """What a plan on sensitive data must be: one sensitive table, its source, aggregates
    only, a finite ε of at most 10."""
    sensitive = {m.name for m in aliases.values() if m.tier == "sensitive"}
    if len(sensitive) > 1:
        raise PlanRefused("a plan may touch one sensitive table (its budget is charged)")
    if source.tier != "sensitive":
        raise PlanRefused("the sensitive table must be the plan's source (FROM) table")
    if plan.HasField("rows"):
        raise PlanRefused("row-level output is only allowed on open tables")
    if not plan.HasField("privacy") or not plan.privacy.epsilon > 0:
        raise PlanRefused("sensitive data is released only with differential privacy: "
                          "the plan carries no ε")
    if not math.isfinite(plan.privacy.epsilon) or plan.privacy.epsilon > 10:
        raise PlanRefused("ε per query must be finite and at most 10")


def _dp_aggregate(i: int, agg: pb.Aggregate, inner: exp.Select, scope: _Scope,
                  bounds_of: dict[tuple[str, str], tuple[float, float]]
                  ) -> tuple[exp.Select, DpPartial, exp.Expression]:
    """One aggregate of a DP plan: its (clamped) argument selected as ``__a{i}`` in the
    inner query, its partial's bounds and its outer aggregate."""
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
        arg = scope.compile_expr(agg.arg)
        if agg.kind in (pb.SUM, pb.SUM_SQUARES):
            arg = clamp(arg, *arg_bounds)
        inner = inner.select(exp.alias_(arg, _ident(col)), copy=False)  # our own copy
        ref = exp.column(_ident(col))
        value = exp.Count(this=ref) if agg.kind == pb.COUNT else _aggregate_sql(agg.kind, ref)
    return inner, DpPartial(agg.name, agg.kind, lo, hi), exp.alias_(value, _ident(agg.name))


def _compile_dp(plan: pb.Plan, query: exp.Select, scope: _Scope) -> CompiledPlan:
    """A plan on sensitive data: bounded contributions, keys from public domains."""
    aliases = scope.aliases
    source_alias = plan.source.alias or plan.source.table
    source = aliases[source_alias]
    _check_dp(plan, aliases, source)
    bounds_of = {(a, c): b for a, m in aliases.items() for c, b in m.bounds.items()}
    domains_of = {(a, c): d for a, m in aliases.items() for c, d in m.public_domains.items()}
    inner = query.copy()
    group_names, domains = [], []
    for key in plan.group_by:
        _check_name("group key", key.name)
        domains.append(key_domain(key.expr, domains_of, bounds_of))
        group_names.append(key.name)
        inner = inner.select(exp.alias_(scope.compile_expr(key.expr), _ident(key.name)),
                             copy=False)  # a copy of its own (above): built in place
    cells = math.prod(len(d) for d in domains)
    if cells > MAX_DP_CELLS:
        raise PlanRefused(f"the public domains of the group keys make {cells} cells "
                          f"(at most {MAX_DP_CELLS})")
    if not plan.aggregates or len(plan.aggregates) > MAX_AGGREGATES:
        raise PlanRefused(f"a DP plan has 1 to {MAX_AGGREGATES} aggregates")
    partials, outer_aggs = [], []
    for i, agg in enumerate(plan.aggregates):
        inner, partial, outer_agg = _dp_aggregate(i, agg, inner, scope, bounds_of)
        partials.append(partial)
        outer_aggs.append(outer_agg)
    outer = exp.select(*[exp.column(_ident(g)) for g in group_names], *outer_aggs)
    # Each unit keeps at most max_rows_per_unit rows, picked at random. The per-unit rank is
    # a full sort (0.4–1.2 s per 3M rows), so it is skipped when the node knows from load
    # time that no unit has more rows than that and no join can multiply them (a WHERE
    # only removes rows).
    if plan.joins or not 0 < source.max_unit_rows <= source.max_rows_per_unit:
        unit = _unit(source_alias, source, scope.resolve)
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
        outer = outer.group_by(exp.Literal.number(i + 1), copy=False)
    spec = DpSpec(plan.privacy.epsilon, plan.privacy.delta, source.max_rows_per_unit,
                  tuple(partials), tuple(domains), source.name)
    return CompiledPlan(outer.sql("duckdb"), "sensitive", scope.tables, False,
                        tuple(group_names), tuple(domains),
                        tuple((p.name, p.kind) for p in partials), 0, 1, dp=spec)


def _unit(alias: str, meta: TableMeta, resolve: Callable[[str, str], exp.Expression]
          ) -> exp.Expression:
    """The unit of a row of ``alias``: its privacy unit column, or the row itself (DuckDB's
    rowid) when the table declares none or declares ``privacy_unit = "row"``."""
    if meta.privacy_unit and meta.privacy_unit != ROW_UNIT:
        return resolve(alias, meta.privacy_unit)
    return exp.Column(this=exp.to_identifier("rowid"), table=_ident(alias))


def _square(arg: exp.Expression) -> exp.Expression:
    """x·x in DOUBLE, which cannot raise (on BIGINT it overflows beyond 3e9: an error one
    row's value would decide); the merge computes variances in DOUBLE anyway."""
    x = exp.TryCast(this=exp.paren(arg), to=exp.DataType.build("DOUBLE"))
    return exp.Mul(this=x, expression=x.copy())


def _aggregate_sql(kind: int, arg: exp.Expression) -> exp.Expression:
    if kind == pb.COUNT:
        return exp.Count(this=arg)
    if kind == pb.SUM:
        return exp.Sum(this=arg)
    if kind == pb.SUM_SQUARES:
        return exp.Sum(this=_square(arg))
    if kind == pb.MIN:
        return exp.Min(this=arg)
    if kind == pb.MAX:
        return exp.Max(this=arg)
    raise PlanRefused("unknown aggregate kind")


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
