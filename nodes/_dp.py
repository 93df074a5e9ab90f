"""The sensitive tier at the node: contribution-bounded partials, released with DP noise.

Compilation: every group key must come from a declared public domain (a column with a
domain, or ``bucket(col, width)`` over a column with bounds), so the released keys never
depend on the data; each unit keeps at most ``max_rows_per_unit`` rows (chosen at random);
summed values are clamped to the column's declared bounds.
Release: the plan's ε is split equally over its partial aggregates (sequential
composition); within one partial, groups are disjoint, so one unit changes the whole
vector by at most its sensitivity (L1) and the vector costs ε_i once. Noise is Laplace,
drawn by OpenDP (privacy/_mechanisms.py).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pyarrow as pa
from sqlglot import exp

from federation.proto import bulle_pb2 as pb
from privacy import ComposedDpEvent, dp_count, dp_sum, laplace_event

MAX_DOMAIN_CELLS = 100_000


class DpRefused(ValueError):
    """Raised by compilation; converted to PlanRefused by the caller."""


@dataclass(frozen=True)
class DpPartial:
    name: str
    kind: int
    lower: float  # bounds of one row's contribution to this partial
    upper: float


@dataclass(frozen=True)
class DpSpec:
    epsilon: float
    delta: float
    max_rows_per_unit: int
    partials: tuple[DpPartial, ...]
    domains: tuple[tuple[object, ...], ...]
    table: str  # the one sensitive table whose budget is charged

    @property
    def epsilon_each(self) -> float:
        return self.epsilon / max(len(self.partials), 1)

    def event(self) -> ComposedDpEvent:
        # closed-form events (privacy/_events.py): a SQL node needs no dp-accounting
        return ComposedDpEvent([laplace_event(self.epsilon_each)] * len(self.partials))


def _literal_number(e: pb.Expr) -> float | None:
    if e.WhichOneof("kind") != "literal":
        return None
    kind = e.literal.WhichOneof("value")
    if kind == "int_value":
        return float(e.literal.int_value)
    if kind == "float_value":
        return e.literal.float_value
    return None


def value_bounds(e: pb.Expr, bounds_of: dict[tuple[str, str], tuple[float, float]]
                 ) -> tuple[float, float] | None:
    """Bounds of an aggregate argument: a bounded column, a number, or a CASE whose
    results are bounded (e.g. ``CASE WHEN g3 >= 10 THEN 1 ELSE 0 END``)."""
    kind = e.WhichOneof("kind")
    if kind == "column":
        return bounds_of.get((e.column.table, e.column.name))
    if kind == "literal":
        v = _literal_number(e)
        return (v, v) if v is not None else (0.0, 0.0) if e.literal.is_null else None
    if kind == "call" and e.call.op == "case":
        args = list(e.call.args)
        results = args[1::2] if len(args) % 2 == 0 else [*args[1:-1:2], args[-1]]
        found = [value_bounds(r, bounds_of) for r in results]
        if any(b is None for b in found):
            return None
        lo = min(b[0] for b in found)
        hi = max(b[1] for b in found)
        if len(args) % 2 == 0:  # no ELSE: NULL, which sums as nothing
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        return lo, hi
    if kind == "call" and e.call.op == "cast" and e.call.args:
        return value_bounds(e.call.args[0], bounds_of)
    return None


def key_domain(e: pb.Expr, domains_of: dict[tuple[str, str], tuple[object, ...]],
               bounds_of: dict[tuple[str, str], tuple[float, float]]) -> tuple[object, ...]:
    kind = e.WhichOneof("kind")
    if kind == "column":
        found = domains_of.get((e.column.table, e.column.name))
        if found is not None:
            return found
        raise DpRefused(f"GROUP BY {e.column.name!r} on sensitive data needs a declared public "
                        "domain for that column (keys must not come from the data)")
    if kind == "call" and e.call.op == "bucket" and len(e.call.args) == 2:
        col, width = e.call.args
        w = _literal_number(width)
        b = bounds_of.get((col.column.table, col.column.name)) if col.HasField("column") else None
        if b is not None and w is not None and w > 0:
            first, last = math.floor(b[0] / w), math.floor(b[1] / w)
            if last - first > MAX_DOMAIN_CELLS:
                raise DpRefused("bucket width too small for the column's bounds")
            return tuple(float(k * w) for k in range(first, last + 1))
    raise DpRefused("GROUP BY on sensitive data takes columns with a declared public domain "
                    "or bucket(column, width) over a column with declared bounds")


def partial_bounds(kind: int, b: tuple[float, float] | None, name: str) -> tuple[float, float]:
    if kind in (pb.COUNT_ROWS, pb.COUNT):
        return 0.0, 1.0
    if b is None:
        raise DpRefused("SUM/AVG/VAR on sensitive data take a column with declared bounds, "
                        "or a CASE of constants")
    lo, hi = b
    if kind == pb.SUM:
        return lo, hi
    if kind == pb.SUM_SQUARES:
        low = 0.0 if lo <= 0 <= hi else min(lo * lo, hi * hi)
        return low, max(lo * lo, hi * hi)
    raise DpRefused("MIN and MAX are not released from sensitive data: they are one pupil's "
                    "value")


def clamp(arg: exp.Expression, lo: float, hi: float, keep_type: bool = False
          ) -> exp.Expression:
    """``arg`` clamped to [lo, hi], as a DOUBLE unless ``keep_type`` (integral bounds then
    keep an integer column integer); NULL stays NULL (not counted in a SUM).

    A CASE, not GREATEST/LEAST: those skip NULLs (LEAST(hi, NULL) = hi, so a missing value
    would be summed as the upper bound), and with decimal literals they are 4-5× slower in
    DuckDB (benchmarks/RESULTS.md, R3).
    """
    def bound(v: float) -> exp.Expression:
        if keep_type and float(v).is_integer() and abs(v) < 2**62:
            return exp.Literal.number(int(v))
        return exp.Cast(this=exp.Literal.number(repr(float(v))),
                        to=exp.DataType.build("DOUBLE"))

    low, high = bound(lo), bound(hi)
    value = exp.paren(arg) if keep_type else exp.Cast(this=arg, to=exp.DataType.build("DOUBLE"))
    return exp.Case(ifs=[exp.If(this=exp.LT(this=value, expression=low), true=low.copy()),
                         exp.If(this=exp.GT(this=value.copy(), expression=high),
                                true=high.copy())],
                    default=value.copy())


def release(table: pa.Table, group_names: tuple[str, ...], spec: DpSpec
            ) -> tuple[pa.Table, dict[str, float]]:
    """Zero-fill the public domains, add Laplace noise to each partial vector.

    Noisy counts are rounded to whole numbers (post-processing: free under DP). They are
    not clamped at 0 here: a partial is summed with other nodes' at the coordinator, and
    clamping each one first would bias a federated total upwards by about b/2 per node for
    small cells; the coordinator clamps the merged value instead (federation/_dp_rules.py).
    """
    rows = {tuple(r[g] for g in group_names): r for r in table.to_pylist()}
    cells = list(itertools.product(*spec.domains)) if group_names else [()]
    keys_out = [[c[i] for c in cells] for i in range(len(group_names))]
    columns: dict[str, list[object]] = dict(zip(group_names, keys_out, strict=True))
    scales = {}
    for p in spec.partials:
        exact = [float((rows.get(c) or {}).get(p.name) or 0.0) for c in cells]
        if p.kind in (pb.COUNT_ROWS, pb.COUNT):
            released = dp_count(exact, spec.epsilon_each, spec.max_rows_per_unit)
            columns[p.name] = [float(round(r.value)) for r in released]
        else:
            released = dp_sum(exact, spec.epsilon_each, p.lower, p.upper, spec.max_rows_per_unit)
            columns[p.name] = [r.value for r in released]
        scales[p.name] = released[0].noise_scale if released else 0.0
    columns["__suppressed"] = [False] * len(cells)
    fields = [table.schema.field(g) for g in group_names]
    schema = pa.schema([*fields, *(pa.field(p.name, pa.float64()) for p in spec.partials),
                        pa.field("__suppressed", pa.bool_())])
    return pa.Table.from_pydict(columns, schema=schema), scales
