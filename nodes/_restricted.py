"""The restricted tier at the node: plans compiled for the cell key method, and the release.

Compile (``restricted_sql``): every aggregate is first summed per privacy unit, so that the
node knows, per cell and per aggregate, what each *unit* contributed — not each row:

    rows   → keys, unit, record key, the aggregates' arguments   (FROM/JOIN/WHERE)
    units  → per (keys, unit): the unit's contribution to each aggregate
    cells  → per keys: value, contributing units, cell key and, for magnitudes, the
             value key (what each contributing unit adds, keyed by its record key)

Every argument is clamped to static bounds (``contribution_bounds``: declared bounds, or
the power-of-two envelope the node computes at load), so the noise scale is a function of
the plan and the config, never of the data: an offset or a weight added to one pupil's
row makes the noise larger for every cell, not that pupil visible.

When each unit has one row and nothing is joined, the middle step is the identity and is
skipped (one aggregation, as for an open table). Release (``release``): the cells get the
perturbations of ``privacy/_ckm.py``; a cell is released only if its perturbed number of
units, and that of every aggregate's contributing units, reaches the threshold; a cell
below it is "< k" (NULL + flag) when its key is public and dropped silently otherwise —
no count of dropped cells leaves, and 0 and small look the same.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot

from federation.proto import bulle_pb2 as pb
from nodes._dp import clamp
from privacy import CkmParams, count_perturbation, magnitude_draw

RECORD_KEY = "__bulle_rk"  # hidden column of every restricted table: the record key
MAX_GROUPS = 100_000
_KEY_MOD = 1 << 32
COUNT_KINDS = (pb.COUNT_ROWS, pb.COUNT)
ORDER_KINDS = (pb.MIN, pb.MAX)


class GroupCapExceeded(RuntimeError):
    """More groups than a release may hold (data-dependent: handled as a failure)."""


@dataclass(frozen=True)
class RestrictedAgg:
    name: str
    kind: int
    arg_sql: str | None  # the argument, compiled and clamped (None for COUNT(*))
    # the most one unit can add to the cell (static: declared bounds × rows per unit), and
    # whether every row adds 0 or 1 (a count however written) — both decided from the plan
    # and the config, never from the data, so that no unit moves its cell's noise scale
    scale: float = 1.0
    count_like: bool = True
    unit_bounds: tuple[float, float] | None = None  # clamp of a unit's summed contribution


def record_key_secret(state_dir: Path) -> str:
    """The node's own secret for record keys, made once (0600) and kept: record keys, and
    so every released perturbation, stay the same across restarts and reloads."""
    path = state_dir / "record_keys.secret"
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text(encoding="ascii").strip()
        if len(secret) != 64:
            raise RuntimeError(f"{path}: not a record-key secret (64 hex digits)") from None
        return secret
    secret = secrets.token_hex(32)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


def add_record_keys(con: duckdb.DuckDBPyConnection, table: str, unit: str,
                    state_dir: Path) -> None:
    """Give every row of a loaded restricted table the 32-bit record key of its unit:
    the first 32 bits of SHA-256(node secret, unit) — or of (secret, table, row number)
    when each row is its own unit. Done once at load, before the lock-down."""
    secret = record_key_secret(state_dir)
    of = (f"CAST({_q(unit)} AS VARCHAR)" if unit
          else f"'{table}' || chr(31) || CAST(rowid AS VARCHAR)")
    con.execute(f"ALTER TABLE {_q(table)} ADD COLUMN {RECORD_KEY} UINTEGER")
    con.execute(f"UPDATE {_q(table)} SET {RECORD_KEY} = CAST(('0x' || left(sha256("
                f"'{secret}' || chr(31) || {of}), 8)) AS UINTEGER)")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def restricted_sql(source_sql: str, keys: list[tuple[str, str]], unit_sql: str,
                   record_key_sql: str, aggs: list[RestrictedAgg], per_unit: bool,
                   keyed: bool = True) -> str:
    """The cell-level SQL over ``source_sql`` (a ``FROM … [JOIN …] [WHERE …]`` clause).

    ``keys``: (output name, compiled expression); names were checked by the caller.
    ``keyed``: compute the cell and value keys the perturbation draws from; a table released
    unperturbed (``perturb = false``) needs neither, and the per-row hashes are most of the
    query's CPU (issue 13).
    """
    row_items = [f"{sql} AS {_q(name)}" for name, sql in keys]
    key_names = [_q(name) for name, _ in keys]
    if per_unit:
        row_items.append(f"{unit_sql} AS __unit")
        unit_items = [*key_names, "__unit"]
        if keyed:
            row_items.append(f"{record_key_sql} AS __rk")
            unit_items.append("any_value(__rk) AS __rk")
        for i, a in enumerate(aggs):
            if a.arg_sql is not None:
                row_items.append(f"{a.arg_sql} AS __a{i}")
            unit_items.append(f"{_bounded(_per_unit(a.kind, f'__a{i}'), a.unit_bounds)} AS __c{i}")
        inner = (f"SELECT {', '.join(unit_items)} FROM (SELECT {', '.join(row_items)} "
                 f"{source_sql}) AS __rows GROUP BY {', '.join([*key_names, '__unit'])}")
    else:  # one row per unit: a row's contribution is its own value
        if keyed:
            row_items.append(f"{record_key_sql} AS __rk")
        for i, a in enumerate(aggs):
            row_items.append(f"{_per_row(a.kind, a.arg_sql)} AS __c{i}")
        inner = f"SELECT {', '.join(row_items)} {source_sql}"
    cell_items = [*key_names, "count(*) AS __n"]
    if keyed:
        cell_items.append(f"sum(__rk) % {_KEY_MOD} AS __k")
    for i, a in enumerate(aggs):
        c = f"__c{i}"
        if a.kind in ORDER_KINDS:
            fn = "min" if a.kind == pb.MIN else "max"
            cell_items.append(f"{fn}({c}) AS {_q(a.name)}")
            continue
        # COUNT(x) with one row per unit: the row's own argument, counted once (its value
        # and its contributors are the same count, which DuckDB computes once)
        row_count = not per_unit and a.kind == pb.COUNT
        nonzero = f"{c} IS NOT NULL" if row_count else f"{c} <> 0"
        # a count's records are the units it counts (however the count is written); a
        # magnitude's are every unit with a value, 0 included: a pupil who adds 0 is still
        # a different set of records, so leaving one out is never an exact difference
        members = nonzero if a.count_like else f"{c} IS NOT NULL"
        cell_items.append(f"{'count' if row_count else 'sum'}({c}) AS {_q(a.name)}")
        # count_if and CASE inside the sum, not FILTER clauses: the same values, but DuckDB
        # evaluates a FILTER per aggregate with its own selection (2× the CPU, issue 13)
        if a.kind != pb.COUNT_ROWS:  # COUNT(*): every unit of the cell, its __n and __k
            cell_items.append(f"count({c}) AS __n{i}" if row_count
                              else f"count_if({nonzero}) AS __n{i}")
            if keyed:
                cell_items.append(f"sum(CASE WHEN {members} THEN __rk ELSE 0 END) "
                                  f"% {_KEY_MOD} AS __k{i}")
        if keyed and not a.count_like:
            # the value key: what each of them adds, keyed by its record key. The same
            # units with other contributions (an offset, a reweighted row) get an
            # independent draw, so the difference of two such sums is never exact
            cell_items.append(f"coalesce(sum(CASE WHEN {members} THEN hash(__rk, CAST({c} AS "
                              f"DOUBLE)) END) % {_KEY_MOD}, 0) AS __v{i}")
    group = f" GROUP BY {', '.join(key_names)}" if key_names else ""
    return (f"SELECT {', '.join(cell_items)} FROM ({inner}) AS __units{group} "
            f"LIMIT {MAX_GROUPS + 1}")


def _bounded(sql: str, bounds: tuple[float, float] | None) -> str:
    """A unit's contribution kept within its static bounds (a join can multiply its rows)."""
    if bounds is None:
        return sql
    return clamp(sqlglot.parse_one(sql, read="duckdb"), *bounds, keep_type=True).sql("duckdb")


def _per_unit(kind: int, arg: str) -> str:
    if kind == pb.COUNT_ROWS:
        return "count(*)"
    if kind == pb.COUNT:
        return f"count({arg})"
    if kind in (pb.SUM, pb.SUM_SQUARES):  # the argument is already squared for SUM_SQUARES
        return f"sum({arg})"
    return f"{'min' if kind == pb.MIN else 'max'}({arg})"


def _per_row(kind: int, arg: str | None) -> str:
    if kind == pb.COUNT_ROWS:
        return "1"
    assert arg is not None  # COUNT(x): x itself, counted by the cell (restricted_sql)
    return arg


Bounds = dict[tuple[str, str], tuple[float, float]]
_BOOLEAN_OPS = frozenset({"eq", "neq", "lt", "lte", "gt", "gte", "and", "or", "not",
                          "is_null", "in", "between", "like", "ilike"})


def contribution_bounds(e: pb.Expr, bounds: Bounds) -> tuple[float, float] | None:
    """Interval bounds of a row's value of ``e``: columns from ``bounds``, numbers, casts,
    CASE/COALESCE, + − × and negation, abs, rounding, conditions (0 or 1). None when the
    expression has no static bound (it is then refused on restricted data)."""
    kind = e.WhichOneof("kind")
    if kind == "column":
        return bounds.get((e.column.table, e.column.name))
    if kind == "literal":
        return _literal_bounds(e.literal)
    if kind != "call":
        return None
    op, args = e.call.op, list(e.call.args)
    if op in _BOOLEAN_OPS:
        return 0.0, 1.0
    if op in ("cast", "round", "floor", "ceil") and args:
        inner = contribution_bounds(args[0], bounds)
        # rounding moves a value by less than 1; a cast to an integer type rounds
        return None if inner is None else (inner[0] - 1, inner[1] + 1) if op != "cast" \
            else (math.floor(inner[0]), math.ceil(inner[1]))
    if op in ("case", "coalesce"):
        return _branch_bounds(op, args, bounds)
    parts = [contribution_bounds(a, bounds) for a in args]
    if not parts or any(b is None for b in parts):
        return None
    return _arithmetic_bounds(op, parts)  # type: ignore[arg-type]


def _literal_bounds(literal: pb.Literal) -> tuple[float, float] | None:
    lit = literal.WhichOneof("value")
    if lit in (None, "is_null"):
        return 0.0, 0.0  # NULL adds nothing
    if lit in ("int_value", "float_value"):
        v = float(getattr(literal, lit))
        return v, v
    return (0.0, 1.0) if lit == "bool_value" else None


def _branch_bounds(op: str, args: list[pb.Expr], bounds: Bounds
                   ) -> tuple[float, float] | None:
    """CASE (its results) or COALESCE (its arguments): the hull of the branches, and 0."""
    results = args if op == "coalesce" else (
        args[1::2] if len(args) % 2 == 0 else [*args[1:-1:2], args[-1]])
    found = [contribution_bounds(r, bounds) for r in results]
    if not found or any(b is None for b in found):
        return None
    lo = min(b[0] for b in found)  # type: ignore[index]
    hi = max(b[1] for b in found)  # type: ignore[index]
    return min(lo, 0.0), max(hi, 0.0)  # no ELSE / all NULL: adds nothing


def _arithmetic_bounds(op: str, parts: list[tuple[float, float]]
                       ) -> tuple[float, float] | None:
    """Negation, abs, + − × of bounded operands (interval arithmetic)."""
    if op == "neg" and len(parts) == 1:
        return -parts[0][1], -parts[0][0]
    if op == "abs" and len(parts) == 1:
        lo, hi = parts[0]
        return (0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
    if op in ("add", "sub", "mul") and len(parts) == 2:
        (a, b), (c, d) = parts
        if op == "add":
            return a + c, b + d
        if op == "sub":
            return a - d, b - c
        products = (a * c, a * d, b * c, b * d)
        return min(products), max(products)
    return None


def is_indicator(e: pb.Expr, zero_one: frozenset[tuple[str, str]] = frozenset()) -> bool:
    """Whether every row's value of ``e`` is 0, 1 or NULL whatever the data: a count
    however it is written (SUM(CASE WHEN c THEN 1 ELSE 0 END), SUM(CAST(c AS INTEGER)),
    SUM of a ``zero_one`` column: integer, bounded within [0, 1])."""
    kind = e.WhichOneof("kind")
    if kind == "column":
        return (e.column.table, e.column.name) in zero_one
    if kind == "literal":
        lit = e.literal.WhichOneof("value")
        return lit in (None, "is_null", "bool_value") or (
            lit in ("int_value", "float_value") and getattr(e.literal, lit) in (0, 1))
    if kind != "call":
        return False
    op, args = e.call.op, list(e.call.args)
    if op in _BOOLEAN_OPS:
        return True
    if op == "cast":
        return bool(args) and is_indicator(args[0], zero_one)
    if op == "case":
        results = args[1::2] if len(args) % 2 == 0 else [*args[1:-1:2], args[-1]]
        return all(is_indicator(r, zero_one) for r in results)
    if op == "coalesce":
        return all(is_indicator(a, zero_one) for a in args)
    return False


def envelope(low: float | None, high: float | None) -> tuple[float, float]:
    """Bounds for a column the operator declared none for: the smallest power of two
    above its largest absolute value (so the data reveal only that power through the
    noise scale), symmetric when the column has negative values."""
    m = max(abs(low or 0), abs(high or 0))
    top = float(2 ** math.ceil(math.log2(m))) if m >= 1 else 1.0
    return (-top if (low or 0) < 0 else 0.0), top


# -- release ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestrictedRelease:
    """What the engine needs to release a restricted plan's cells."""

    group_names: tuple[str, ...]
    key_domains: tuple[tuple[object, ...] | None, ...]
    aggregates: tuple[tuple[str, int], ...]  # (name, AggKind)
    params: CkmParams
    perturb: bool  # False only on nodes allowed exact releases (tests)
    # per aggregate: (scale, count_like) as compiled (RestrictedAgg); default: a count of
    # units with one row each
    noise: tuple[tuple[float, bool], ...] = ()

    def noise_of(self, i: int) -> tuple[float, bool]:
        return self.noise[i] if self.noise else (1.0, True)


def release_restricted(table: pa.Table, r: RestrictedRelease, ptable: np.ndarray
                       ) -> tuple[pa.Table, int]:
    """(released cells: keys, values, ``__suppressed``; number of "< k" cells sent)."""
    if table.num_rows > MAX_GROUPS:
        raise GroupCapExceeded(f"more than {MAX_GROUPS} groups")
    table = _zero_filled(table, r)  # before any rule: empty cells are cells like others
    n = table.num_rows
    k = r.params.threshold
    units = _ints(table, "__n")
    ok = np.ones(n, dtype=bool)
    if r.perturb:
        ok &= units + count_perturbation(ptable, units, _ints(table, "__k")) >= k
    elif k > 0:
        ok &= units >= k
    values: dict[str, pa.Array] = {}
    for i, (name, kind) in enumerate(r.aggregates):
        column = table.column(name)
        if kind in ORDER_KINDS:
            values[name] = column
            continue
        units_of, key_of = _members(i, kind)
        contributors = _ints(table, units_of)
        if r.perturb:
            ok &= contributors + count_perturbation(
                ptable, contributors, _ints(table, key_of)) >= k
            values[name] = _perturbed(table, name, kind, i, r, ptable)
        else:
            if k > 0:
                ok &= contributors >= k
            values[name] = column
    public = _public_keys(table, r)
    keep = ok | public
    out = {g: table.column(g) for g in r.group_names}
    for name, _ in r.aggregates:
        col = values[name]
        out[name] = pc.if_else(pa.array(ok), col, pa.scalar(None, col.type))
    out["__suppressed"] = pa.array(~ok)
    released = pa.table(out).filter(pa.array(keep))
    if r.group_names:  # key order: a cell's position must not tell whether it holds anyone
        released = released.sort_by([(g, "ascending", "at_end") for g in r.group_names])
    return released, int((~ok & keep).sum())


def _perturbed(table: pa.Table, name: str, kind: int, i: int, r: RestrictedRelease,
               ptable: np.ndarray) -> pa.Array:
    """Counts (and 0/1 sums): the ptable's draw for (contributing units, cell key), times
    the most one unit can add. Magnitudes: μ × that bound × v, v keyed on the cell key
    and the value key. The scale is static, so an empty cell of a public domain, a cell
    of zeros and a cell holding the target are perturbed alike."""
    column = table.column(name)
    value = _floats(column)
    scale, count_like = r.noise_of(i)
    units_of, key_of = _members(i, kind)
    key = _ints(table, key_of)
    if count_like or kind in COUNT_KINDS:
        out = value + scale * count_perturbation(ptable, _ints(table, units_of), key)
    else:
        v = magnitude_draw(key, _ints(table, f"__v{i}"))
        out = value + r.params.magnitude * scale * v  # a SUM of nothing stays NULL
    whole = kind in COUNT_KINDS or pa.types.is_integer(column.type) or (
        pa.types.is_decimal(column.type) and column.type.scale == 0)
    if whole:
        out = np.round(out)
        if kind in COUNT_KINDS:
            out = np.maximum(out, 0)
        return pa.array(out, pa.float64(), from_pandas=True).cast(pa.int64(), safe=False)
    return pa.array(out, pa.float64(), from_pandas=True)  # NaN: a SUM of nothing, NULL


def _members(i: int, kind: int) -> tuple[str, str]:
    """The columns holding aggregate i's contributing units and their cell key."""
    return ("__n", "__k") if kind == pb.COUNT_ROWS else (f"__n{i}", f"__k{i}")


def _ints(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if col.null_count:  # a compute call costs ~20 µs even on a column without nulls
        col = pc.fill_null(col, 0)
    if not pa.types.is_integer(col.type):  # DuckDB's HUGEINT sums arrive as decimal128
        col = pc.cast(col, pa.int64(), safe=False)
    return col.to_numpy(zero_copy_only=False).astype(np.int64)


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    """As doubles, never raising (a BIGINT beyond 2^53 is rounded, not an error)."""
    return pc.cast(col, pa.float64(), safe=False).to_numpy(
        zero_copy_only=False).astype(np.float64)


def _public_keys(table: pa.Table, r: RestrictedRelease) -> np.ndarray:
    """Cells whose key is made only of declared public values (they may be named)."""
    n = table.num_rows
    if not r.group_names:
        return np.ones(n, dtype=bool)
    mask = np.ones(n, dtype=bool)
    for g, domain in zip(r.group_names, r.key_domains, strict=True):
        if domain is None:
            return np.zeros(n, dtype=bool)
        column = table.column(g)
        values = pa.array(domain).cast(column.type, safe=False)
        mask &= pc.is_in(column, value_set=values).to_numpy(zero_copy_only=False)
    return mask


def _zero_filled(table: pa.Table, r: RestrictedRelease) -> pa.Table:
    """Every key of the declared public domains is a cell, empty or not."""
    if not r.group_names or any(d is None for d in r.key_domains):
        return table
    cells = 1
    for d in r.key_domains:
        cells *= len(d)  # type: ignore[arg-type]
    if cells > MAX_GROUPS:
        raise GroupCapExceeded(f"the public domains make more than {MAX_GROUPS} cells")
    present = set(zip(*(table.column(g).to_pylist() for g in r.group_names), strict=True))
    missing = [c for c in itertools.product(*r.key_domains) if c not in present]  # type: ignore[arg-type]
    if not missing:
        return table
    counts = {name for name, kind in r.aggregates if kind in COUNT_KINDS}
    filler: dict[str, list[object]] = {}
    for j, g in enumerate(r.group_names):
        filler[g] = [c[j] for c in missing]
    for name in table.column_names:
        if name in filler:
            continue
        empty: object = None
        if name.startswith(("__n", "__k", "__v")) or name in counts:
            empty = 0
        filler[name] = [empty] * len(missing)
    extra = pa.table({name: pa.array(filler[name], type=table.schema.field(name).type)
                      for name in table.column_names})
    return pa.concat_tables([table, extra])
