"""The restricted tier at the node: plans compiled for the cell key method, and the release.

Compile (``restricted_sql``): every aggregate is first summed per privacy unit, so that the
node knows, per cell and per aggregate, what each *unit* contributed — not each row:

    rows   → keys, unit, record key, the aggregates' arguments   (FROM/JOIN/WHERE)
    units  → per (keys, unit): the unit's contribution to each aggregate
    cells  → per keys: value, contributing units, cell key, largest contribution and
             the record key of its unit, whether every row adds 0 or 1 (a count)

When each unit has one row and nothing is joined, the middle step is the identity and is
skipped (one aggregation, as for an open table). Release (``release``): the cells get the
perturbations of ``privacy/_ckm.py``; a cell is released only if its perturbed number of
units, and that of every aggregate's contributing units, reaches the threshold; a cell
below it is "< k" (NULL + flag) when its key is public and dropped silently otherwise —
no count of dropped cells leaves, and 0 and small look the same.
"""

from __future__ import annotations

import itertools
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from federation.proto import bulle_pb2 as pb
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
    arg_sql: str | None  # the argument, compiled (None for COUNT(*))


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
                   record_key_sql: str, aggs: list[RestrictedAgg], per_unit: bool) -> str:
    """The cell-level SQL over ``source_sql`` (a ``FROM … [JOIN …] [WHERE …]`` clause).

    ``keys``: (output name, compiled expression); names were checked by the caller.
    """
    row_items = [f"{sql} AS {_q(name)}" for name, sql in keys]
    key_names = [_q(name) for name, _ in keys]
    if per_unit:
        row_items += [f"{unit_sql} AS __unit", f"{record_key_sql} AS __rk"]
        unit_items = [*key_names, "__unit", "any_value(__rk) AS __rk"]
        for i, a in enumerate(aggs):
            if a.arg_sql is not None:
                row_items.append(f"{a.arg_sql} AS __a{i}")
            unit_items.append(f"{_per_unit(a.kind, f'__a{i}')} AS __c{i}")
            if a.kind in (pb.SUM, pb.SUM_SQUARES):  # whether it counts rows: see __b below
                unit_items.append(f"bool_and(__a{i} = 0 OR __a{i} = 1) AS __r{i}")
        inner = (f"SELECT {', '.join(unit_items)} FROM (SELECT {', '.join(row_items)} "
                 f"{source_sql}) AS __rows GROUP BY {', '.join([*key_names, '__unit'])}")
    else:  # one row per unit: a row's contribution is its own value
        row_items.append(f"{record_key_sql} AS __rk")
        for i, a in enumerate(aggs):
            row_items.append(f"{_per_row(a.kind, a.arg_sql)} AS __c{i}")
        inner = f"SELECT {', '.join(row_items)} {source_sql}"
    cell_items = [*key_names, "count(*) AS __n", f"sum(__rk) % {_KEY_MOD} AS __k"]
    for i, a in enumerate(aggs):
        c = f"__c{i}"
        if a.kind in ORDER_KINDS:
            fn = "min" if a.kind == pb.MIN else "max"
            cell_items.append(f"{fn}({c}) AS {_q(a.name)}")
            continue
        nonzero = f"FILTER (WHERE {c} <> 0)"
        # count-like: every *row* adds 0 or 1 (a SUM of 0/1 counts rows, as COUNT does, even
        # where a unit has several of them): the same release however the count is written
        is_01 = (f"bool_and(__r{i})" if per_unit and a.kind in (pb.SUM, pb.SUM_SQUARES)
                 else f"bool_and({c} = 0 OR {c} = 1)")
        cell_items += [
            f"sum({c}) AS {_q(a.name)}",
            f"count(*) {nonzero} AS __n{i}",
            f"coalesce(sum(__rk) {nonzero} % {_KEY_MOD}, 0) AS __k{i}",
            f"max(abs({c})) AS __y{i}",
            f"arg_max(__rk, (abs({c}), __rk)) {nonzero} AS __t{i}",
            f"coalesce({is_01}, true) AS __b{i}",
        ]
    group = f" GROUP BY {', '.join(key_names)}" if key_names else ""
    return (f"SELECT {', '.join(cell_items)} FROM ({inner}) AS __units{group} "
            f"LIMIT {MAX_GROUPS + 1}")


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
    if kind == pb.COUNT:
        return f"CAST(({arg}) IS NOT NULL AS INTEGER)"
    assert arg is not None
    return arg


# -- release ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestrictedRelease:
    """What the engine needs to release a restricted plan's cells."""

    group_names: tuple[str, ...]
    key_domains: tuple[tuple[object, ...] | None, ...]
    aggregates: tuple[tuple[str, int], ...]  # (name, AggKind)
    params: CkmParams
    perturb: bool  # False only on nodes allowed exact releases (tests)


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
        contributors = _ints(table, f"__n{i}")
        draw = count_perturbation(ptable, contributors, _ints(table, f"__k{i}"))
        if r.perturb:
            ok &= contributors + draw >= k
            values[name] = _perturbed(column, kind, table, i, draw, r.params)
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


def _perturbed(column: pa.ChunkedArray, kind: int, table: pa.Table, i: int,
               draw: np.ndarray, params: CkmParams) -> pa.Array:
    value = _floats(column)
    top = _floats(table.column(f"__y{i}"))
    count_like = table.column(f"__b{i}").to_numpy(zero_copy_only=False).astype(bool)
    whole = kind in COUNT_KINDS or pa.types.is_integer(column.type) or (
        pa.types.is_decimal(column.type) and column.type.scale == 0)
    # counts (and 0/1 sums): the ptable's draw, times the largest contribution of a unit
    # (fmax: an empty cell of a public domain has no largest contribution, and no draw)
    as_count = value + np.fmax(top, 1.0) * draw
    v = magnitude_draw(_ints(table, f"__k{i}"), _ints(table, f"__t{i}"))
    as_magnitude = value + params.magnitude * top * v
    out = np.where(count_like | (kind in COUNT_KINDS), as_count, as_magnitude)
    out = np.where(np.isnan(value), np.nan, out)
    if whole:
        out = np.round(out)
        if kind in COUNT_KINDS:
            out = np.maximum(out, 0)
        # NaN (a SUM with nothing to add) is NULL, never cast to an integer
        return pa.array(out, pa.float64(), from_pandas=True).cast(pa.int64(), safe=False)
    return pa.array(out, pa.float64(), from_pandas=True)


def _ints(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


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
        if name.startswith(("__n", "__k")) or name in counts:
            empty = 0
        elif name.startswith("__b"):
            empty = True
        filler[name] = [empty] * len(missing)
    extra = pa.table({name: pa.array(filler[name], type=table.schema.field(name).type)
                      for name in table.column_names})
    return pa.concat_tables([table, extra])
