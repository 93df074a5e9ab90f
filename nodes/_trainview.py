"""The training view at a node: the run spec (checked against the node's catalogue) and
one example per privacy unit, built on the locked DuckDB.

Names in the spec are checked against this node's own catalogue before any SQL is built;
values never enter SQL (they are compared in numpy). Features are scaled with the layout's
public bounds (from declared bounds or public domains, never from data).

The label is binary: ``(column, op, number)`` with op one of ``>= > <= < = !=``, or
``(column, "in" | "not in", (value, …))`` on a column with a declared public domain here
(the values must be in it). A table whose rows are persons (``privacy_unit = "row"``) has
one example per row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from bulle_flower.spec import SEQUENCE_MODELS, SET_OPS, Feature, SpecError, TrainSpec

_OPS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less,
        "=": np.equal, "!=": np.not_equal}
ROW_UNIT = "row"  # = nodes._config.ROW_UNIT: each row is one person


class TrainingRefused(Exception):
    """The node will not train (or release) this round; the message is safe to send."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def parse_spec(raw: dict[str, Any]) -> TrainSpec:
    """The run's spec (``bulle_flower.spec``: checked where it is built); a spec that does
    not hold is a ``bad_spec`` refusal."""
    try:
        return TrainSpec.from_dict(raw)
    except SpecError as e:
        raise TrainingRefused("bad_spec", str(e)) from None


@dataclass
class View:
    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def check_spec(spec: TrainSpec, meta: dict[str, Any], models: tuple[str, ...]) -> dict[str, str]:
    """Check the spec against this node's catalogue; returns column → table alias."""
    if spec.model not in models:
        raise TrainingRefused("not_allowed", f"this node does not train {spec.model!r}")
    t = meta.get(spec.table)
    if t is None:
        raise TrainingRefused("not_allowed", f"table {spec.table!r} is not published here")
    if t.tier == "open" or not t.privacy_unit:
        raise TrainingRefused("not_allowed", "DP training runs on sensitive or restricted "
                              "tables with a privacy unit (a column, or \"row\")")
    where: dict[str, str] = {c: "t" for c in t.columns}
    for i, (jt, col) in enumerate(spec.joins):
        j = meta.get(jt)
        if j is None or j.tier != "open":
            raise TrainingRefused("not_allowed", f"joins are only with open tables ({jt!r})")
        if col not in t.columns or col not in j.columns:
            raise TrainingRefused("not_allowed", f"join column {col!r} is not in both tables")
        for c in j.columns:
            where.setdefault(c, f"j{i}")
    used = [f.name for f in spec.features] + [spec.label[0]] + \
        ([spec.order_by] if spec.order_by else [])
    for c in used:
        if c not in where:
            raise TrainingRefused("not_allowed", f"column {c!r} is not in the training view")
        if c == t.privacy_unit:
            raise TrainingRefused("not_allowed", "the privacy unit cannot be a feature or label")
    col, op, values = spec.label
    if op in SET_OPS:
        holder = t if where[col] == "t" else meta[spec.joins[int(where[col][1:])][0]]
        domain = {str(v) for v in holder.public_domains.get(col, ())}
        if not domain:
            raise TrainingRefused("not_allowed", f"a label comparing {col!r} to values needs "
                                  "a declared public domain for it")
        if not set(values) <= domain:
            raise TrainingRefused("not_allowed", f"label values must be in the public domain "
                                  f"of {col!r}")
    return where


def _quote(name: str) -> str:
    return '"' + name + '"'


def fetch_rows(cursor: Any, spec: TrainSpec, unit: str, where: dict[str, str]) -> dict[str, Any]:
    """The raw columns of the view, one row per source row (names come from the catalogue)."""
    cols = dict.fromkeys([f.name for f in spec.features] + [spec.label[0]]
                         + ([spec.order_by] if spec.order_by else []))
    unit_sql = "t.rowid" if unit == ROW_UNIT else f"t.{_quote(unit)}"
    select = [f"{unit_sql} AS __unit"] + [f"{where[c]}.{_quote(c)} AS {_quote(c)}"
                                                for c in cols]
    sql = f"SELECT {', '.join(select)} FROM {_quote(spec.table)} AS t"
    for i, (jt, col) in enumerate(spec.joins):
        sql += f" JOIN {_quote(jt)} AS j{i} ON t.{_quote(col)} = j{i}.{_quote(col)}"
    table = cursor.sql(sql).to_arrow_table()
    return {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in table.column_names}


def _floats(v: np.ndarray) -> np.ndarray:
    """A column as float64, NULL → NaN (vectorised: columns are tens of thousands long)."""
    if v.dtype.kind in "iuf":
        return v.astype(np.float64)
    import pandas as pd

    return pd.to_numeric(pd.Series(v, dtype=object), errors="coerce").to_numpy(np.float64)


def encode(rows: dict[str, Any], features: tuple[Feature, ...]) -> np.ndarray:
    """Feature matrix: numbers clamped and scaled to [0, 1] (NULL → 0), categories one-hot."""
    import pandas as pd

    blocks = []
    for f in features:
        v = rows[f.name]
        if f.kind == "num":
            x = np.clip((_floats(v) - f.lo) / (f.hi - f.lo), 0.0, 1.0)
            blocks.append(np.nan_to_num(x, nan=0.0)[:, None])
        else:
            s = pd.Series(v, dtype=object)
            s = s.where(s.notna(), "").astype(str).to_numpy()
            blocks.append(np.stack([(s == c) for c in f.values], axis=1).astype(np.float64))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def label_of(rows: dict[str, Any], label: tuple[str, str, Any]) -> np.ndarray:
    col, op, value = label
    if op in SET_OPS:  # compared as text, as the public domain's values are
        import pandas as pd

        s = pd.Series(rows[col], dtype=object)
        missing = s.isna().to_numpy()
        hit = s.where(~missing, "").astype(str).isin(value).to_numpy()
        out = (hit if op == "in" else ~hit).astype(np.float32)
        out[missing] = np.nan  # no label: the row cannot be used
        return out
    raw = _floats(rows[col])
    out = _OPS[op](raw, value).astype(np.float32)
    out[np.isnan(raw)] = np.nan  # no label: the row cannot be used
    return out


def eval_mask(units: np.ndarray, salt: bytes, fraction: float) -> np.ndarray:
    """A stable held-out set of units (keyed hash, so it does not move between runs)."""
    if fraction <= 0:
        return np.zeros(len(units), dtype=bool)
    cut = int(fraction * 2**32)
    return np.array([int.from_bytes(hashlib.sha256(salt + str(u).encode()).digest()[:4], "big")
                     < cut for u in units])


def build_view(rows: dict[str, Any], spec: TrainSpec, salt: bytes,
               rng: np.random.Generator) -> View:
    """One example per unit. With ``order_by``: the unit's rows in order, the label of
    its last row to predict from the (at most ``max_len``) rows before — as a sequence
    (GRU), or as their mean next to the last row without its label columns (tabular).
    Without: one random row of the unit (tabular)."""
    x_all = encode(rows, spec.features)
    y_all = label_of(rows, spec.label)
    units = rows["__unit"]
    keep = ~np.isnan(y_all) & ~np.array([u is None for u in units])
    x_all, y_all, units = x_all[keep], y_all[keep], units[keep]
    if spec.order_by:
        order = _floats(rows[spec.order_by])[keep]
        idx = np.lexsort((np.nan_to_num(order, nan=np.inf), units))
        x_all, y_all, units = x_all[idx], y_all[idx], units[idx]
        starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
        ends = np.r_[starts[1:], len(units)]
        ok = ends - starts >= 2  # a trace and a next step to predict
        starts, ends = starts[ok], ends[ok]
        last = ends - 1  # the row to predict; before it, at most max_len rows
        first = np.maximum(starts, last - spec.max_len)
        if spec.model in SEQUENCE_MODELS:
            pos = last[:, None] - spec.max_len + np.arange(spec.max_len)[None, :]
            real = pos >= first[:, None]  # left-padded: the GRU ends on real data
            x = np.where(real[..., None], x_all[np.maximum(pos, 0)], 0.0).astype(np.float32)
        else:
            cum = np.vstack([np.zeros((1, x_all.shape[1])), np.cumsum(x_all, axis=0,
                                                                       dtype=np.float64)])
            mean = (cum[last] - cum[first]) / (last - first)[:, None]
            current = x_all[last].copy()
            current[:, _columns_of(spec, spec.label[0])] = 0.0  # the label's own value
            x = np.concatenate([mean, current], axis=1).astype(np.float32)
        y = y_all[last]
        unit_ids = units[starts]
    else:
        perm = rng.permutation(len(units))
        _, first_seen = np.unique(units[perm], return_index=True)
        pick = perm[first_seen]
        x, y, unit_ids = x_all[pick], y_all[pick], units[pick]
    held = eval_mask(unit_ids, salt, spec.eval_fraction)
    return View(x[~held], y[~held], x[held], y[held])


def _columns_of(spec: TrainSpec, name: str) -> np.ndarray:
    """Positions, in an encoded row, of the feature(s) named ``name``."""
    out, at = [], 0
    for f in spec.features:
        if f.name == name:
            out.extend(range(at, at + f.width))
        at += f.width
    return np.array(out, dtype=int)
