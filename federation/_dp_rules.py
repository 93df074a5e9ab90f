"""The sensitive tier at the coordinator: static checks before the charge, post-processing
after the merge.

Checks: the node's DP compile rules (nodes/_dp.py), applied to the query tree with the
catalogue's public domains and bounds, so that a query every node would refuse on its shape
is refused *before* the coordinator reserves its ε (a statically refused query costs
nothing). The nodes still apply their own rules: a plan that passes here and is refused
there keeps the coordinator's charge (conservative).

Post-processing (free under DP): each released aggregate is put back into the range its
true value lies in — counts whole and ≥ 0, a mean of a bounded column within its bounds,
a variance ≥ 0 and at most what the bounds allow — and so are the ends of its interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from federation._catalog import FederatedTable
from federation._errors import QueryError
from federation._tree import Agg, Call, Col, Expr, Lit, Query, walk

MAX_DP_CELLS = 100_000  # as nodes/_compile.py: group-key cells of one DP release
Bounds = dict[tuple[str, str], tuple[float, float]]  # (alias, column) -> declared bounds


@dataclass(frozen=True)
class Range:
    """Where a released value's true value lies: [lower, upper] (None: unbounded)."""

    lower: float | None
    upper: float | None
    whole: bool = False


def _refuse(message: str) -> QueryError:
    return QueryError("not_allowed", message)


def _aliases(query: Query, catalog: dict[str, FederatedTable]) -> dict[str, FederatedTable]:
    refs = [query.source, *(j.table for j in query.joins)]
    return {r.alias or r.table: catalog[r.table] for r in refs}


def bounds_of(query: Query, catalog: dict[str, FederatedTable]) -> Bounds:
    return {(a, c): b for a, t in _aliases(query, catalog).items() for c, b in t.bounds.items()}


def value_range(e: Expr, bounds: Bounds) -> tuple[float, float] | None:
    """Bounds of an aggregate argument, as the node computes them (``value_bounds``): a
    bounded column, a number, NULL, a cast of these, or a CASE whose results are bounded."""
    if isinstance(e, Col):
        return bounds.get((e.table, e.name))
    if isinstance(e, Lit):
        if e.value is None:
            return 0.0, 0.0  # NULL sums as nothing
        if isinstance(e.value, (int, float)) and not isinstance(e.value, bool):
            return float(e.value), float(e.value)
        return None
    if isinstance(e, Call) and e.op == "cast" and e.args:
        return value_range(e.args[0], bounds)
    if isinstance(e, Call) and e.op == "case":
        args = e.args
        results = args[1::2] if len(args) % 2 == 0 else (*args[1:-1:2], args[-1])
        found = [value_range(r, bounds) for r in results]
        known = [b for b in found if b is not None]
        if len(known) < len(found):
            return None
        lo, hi = min(b[0] for b in known), max(b[1] for b in known)
        if len(args) % 2 == 0:  # no ELSE: NULL, which sums as nothing
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        return lo, hi
    return None


def _key_cells(key: Expr, aliases: dict[str, FederatedTable], bounds: Bounds) -> int:
    if isinstance(key, Col):
        domain = aliases[key.table].public_domains.get(key.name) \
            if key.table in aliases else None
        if domain is not None:
            return len(domain)
        raise _refuse(f"GROUP BY {key.name!r} on sensitive data needs a declared public "
                      "domain for that column (keys must not come from the data)")
    if isinstance(key, Call) and key.op == "bucket" and len(key.args) == 2:
        col, width = key.args
        b = bounds.get((col.table, col.name)) if isinstance(col, Col) else None
        w = width.value if isinstance(width, Lit) else None
        if b is not None and isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0:
            return math.floor(b[1] / w) - math.floor(b[0] / w) + 1
    raise _refuse("GROUP BY on sensitive data takes columns with a declared public domain "
                  "or bucket(column, width) over a column with declared bounds")


def check(query: Query, catalog: dict[str, FederatedTable]) -> None:
    """Refuse, before anything is charged, a query every node would refuse on its shape."""
    aliases = _aliases(query, catalog)
    sensitive = {t.name for t in aliases.values() if t.tier == "sensitive"}
    if len(sensitive) > 1:
        raise _refuse("a query may touch one sensitive table (its budget is charged)")
    if catalog[query.source.table].tier != "sensitive":
        raise _refuse("the sensitive table must be the query's source (FROM) table")
    bounds = bounds_of(query, catalog)
    cells = math.prod(_key_cells(k, aliases, bounds) for k in query.group_by)
    if cells > MAX_DP_CELLS:
        raise _refuse(f"the public domains of the group keys make {cells} cells "
                      f"(at most {MAX_DP_CELLS})")
    exprs = [i.expr for i in query.items] + [query.having] + [o.expr for o in query.order_by]
    for agg in (n for e in exprs for n in walk(e) if isinstance(n, Agg)):
        if agg.func in ("min", "max"):
            raise _refuse("MIN and MAX are not released from sensitive data: they are one "
                          "pupil's value")
        if agg.func != "count" and (agg.arg is None or value_range(agg.arg, bounds) is None):
            raise _refuse("SUM/AVG/VAR on sensitive data take a column with declared bounds, "
                          "or a CASE of constants")


def ranges(query: Query, bounds: Bounds) -> dict[str, Range]:
    """The public range of each released item that is a bare aggregate, by item name."""
    out = {}
    for item in query.items:
        agg = item.expr
        if not isinstance(agg, Agg):
            continue
        if agg.func == "count":
            out[item.name] = Range(0.0, None, whole=True)
            continue
        b = value_range(agg.arg, bounds) if agg.arg is not None else None
        if b is None:
            continue
        lo, hi = b
        if agg.func == "avg":
            out[item.name] = Range(lo, hi)
        elif agg.func == "sum":  # any number of values in [lo, hi]: only the sign is known
            out[item.name] = Range(0.0 if lo >= 0 else None, 0.0 if hi <= 0 else None)
        elif agg.func.startswith(("var", "stddev")):
            # Popoviciu: a population variance is at most (hi - lo)² / 4; a sample one at
            # most n/(n-1) times that, so (hi - lo)² / 2 for n ≥ 2
            top = (hi - lo) ** 2 / (4.0 if agg.func.endswith("_pop") else 2.0)
            out[item.name] = Range(0.0, math.sqrt(top) if agg.func.startswith("stddev")
                                   else top)
    return out


_ROUND = {"nearest": np.round, "down": np.floor, "up": np.ceil}


def _clip(values: np.ndarray, r: Range, rounding: str = "nearest") -> np.ndarray:
    """``values`` in [lower, upper]; whole numbers rounded (interval ends outwards)."""
    if r.whole:
        values = _ROUND[rounding](values)
    return np.clip(values, -np.inf if r.lower is None else r.lower,
                   np.inf if r.upper is None else r.upper)


def post_process(table: pa.Table, intervals: tuple[list[list[float | None]], ...] | None,
                 item_ranges: dict[str, Range]) -> pa.Table:
    """``table`` with each ranged column clipped (whole columns as integers); the interval
    ends (``(sd, low, high)``, per row, per column) are clipped in place the same way."""
    for name, r in item_ranges.items():
        if name not in table.column_names:
            continue
        i = table.column_names.index(name)
        column = table.column(i)
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        clipped = _clip(values, r)  # NaN (NULL) stays NaN
        mask = pc.is_null(column).to_numpy(zero_copy_only=False)
        kind = pa.int64() if r.whole else pa.float64()
        fixed = pa.array(np.where(mask, 0, clipped).astype(kind.to_pandas_dtype()),
                         kind, mask=mask)
        table = table.set_column(i, table.field(i).with_type(kind), fixed)
        if intervals is None:
            continue
        _, low, high = intervals
        for row in range(table.num_rows):
            for ends, rounding in ((low, "down"), (high, "up")):
                if ends[row][i] is not None:
                    ends[row][i] = float(_clip(np.array([ends[row][i]]), r, rounding)[0])
    return table
