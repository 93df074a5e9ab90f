"""Data-quality report of a dataset, computed where the data is: when the node loads it and
when ``bulle node ingest`` writes it (stored beside the Parquet as ``<name>.quality.json``).

Measured on the table as served (after the dataset's ``filter``):

- **completeness** of a column: non-null cells / rows. ``C`` = mean over the columns.
- **validity** of a check, one per column with declared ``public_domains`` and one per column
  with ``bounds = [lo, hi]``: non-null values inside the domain (or the closed bounds) /
  non-null values. ``V`` = mean over the checks; a check on an all-null column is skipped.
- **uniqueness** of the privacy unit: rows whose unit is non-null and has at most
  ``max_rows_per_unit`` rows / rows. ``U`` enters the score only for the ``sensitive`` tier,
  where that limit is enforced; a restricted table with one row per assessment legitimately
  holds many rows per unit, so elsewhere U is reported but not scored.
- **freshness**: modification time of the source files (of the raw inputs, for an ingested
  dataset) and ingest time. Reported, not scored: old data is not worse data.

``score = round_half_up(100 × mean of the components present among C, V, U)``, an integer
0–100; an empty table scores 0. Example: 4 rows, columns ``a`` (1 null) and ``b`` (none):
C = (0.75 + 1) / 2; a domain check on ``b`` with 3 of 4 values valid: V = 0.75;
score = round(100 × (0.875 + 0.75) / 2) = 81.

Published in the catalogue (``TableInfo.quality``): percentages with one decimal and counts
of failing values; for ``restricted`` and ``sensitive`` tables counts below 10 are sent as
``"<10"``; for ``sensitive`` ones percentages and the score are rounded to 5 points, counts
to 10 and the number of units is a bucket (like the row count, for every tier).
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from sqlglot import exp

from federation.proto import bulle_pb2 as pb
from nodes._config import ConfigError, DatasetConfig
from nodes._sources import _quote, row_count_bucket, table_columns, type_family

# Columns that join datasets of the education system, by normalised name.
PIVOT_NAMES = {
    "school": {"uai", "code_uai", "numero_uai", "uai_etablissement", "school",
               "identifiant_de_l_etablissement", "numero_de_l_ecole", "numero_du_college",
               "numero_d_etablissement", "code_etablissement", "numero_uai_etablissement"},
    "year": {"rentree_scolaire", "annee_scolaire", "rentree", "session", "school_year",
             "academic_year"},
    "level": {"niveau", "niveau_scolaire", "code_niveau", "classe", "grade", "level"},
    "area": {"code_du_departement", "code_departement", "departement", "academie",
             "code_academie", "region_academique", "code_region",
             "code_insee_de_la_commune", "code_commune"},
}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def freshness_of(ds: DatasetConfig) -> dict[str, str | None]:
    """Source modification and ingest times; an ingest manifest vouching for the file wins."""
    files = [p for p in ds.source if p.is_file()]
    out: dict[str, str | None] = {
        "source_modified_at": iso(max(p.stat().st_mtime for p in files)) if files else None,
        "ingested_at": None}
    if len(files) == 1 and files[0].suffix == ".parquet":
        manifest = files[0].with_name(files[0].stem + ".manifest.json")
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return out
        if m.get("output_sha256") == sha256_file(files[0]):
            out = {"source_modified_at": m.get("source_modified_at"),
                   "ingested_at": m.get("ingested_at")}
    return out


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _in_domain(col: str, values: tuple[Any, ...], duck_type: str) -> str:
    q = _quote(col)
    if type_family(duck_type) in ("integer", "number"):
        try:
            nums = ", ".join(repr(float(v)) for v in values)
        except (TypeError, ValueError):
            raise ConfigError(f"public domain of {col!r} must be numbers") from None
        return f"TRY_CAST({q} AS DOUBLE) IN ({nums})"
    texts = ", ".join(exp.Literal.string(str(v)).sql("duckdb") for v in values)
    return f"CAST({q} AS VARCHAR) IN ({texts})"


def compute_quality(con: duckdb.DuckDBPyConnection, ds: DatasetConfig,
                    freshness: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The full report of table ``ds.table`` (exact numbers: it stays at the node)."""
    columns = dict(table_columns(con, ds.table))
    declared = (*ds.bounds, *(ds.onboarding.pivots if ds.onboarding else ()))
    missing = [c for c in declared if c not in columns]
    if missing:
        raise ConfigError(f"dataset {ds.table!r}: declared column {missing[0]!r} (bounds or "
                          "pivots) does not exist")
    t = _quote(ds.table)
    names = list(columns)
    row = con.execute(f"SELECT count(*), {', '.join(f'count({_quote(c)})' for c in names)} "
                      f"FROM {t}").fetchall()[0]
    rows = int(row[0])
    report: dict[str, Any] = {
        "format": 1, "table": ds.table, "tier": ds.tier, "rows": rows,
        "columns": {c: {"nulls": rows - int(n), "completeness": (int(n) / rows if rows else 0.0)}
                    for c, n in zip(names, row[1:], strict=True)},
        "checks": [], "privacy_unit": None,
        "freshness": freshness if freshness is not None else freshness_of(ds),
    }
    rules = [(c, "domain", _in_domain(c, v, columns[c])) for c, v in ds.public_domains.items()
             if c in columns]
    rules += [(c, "bounds", f"TRY_CAST({_quote(c)} AS DOUBLE) BETWEEN {lo!r} AND {hi!r}")
              for c, (lo, hi) in ds.bounds.items()]
    if rules:
        sel = ", ".join(f"count({_quote(c)}), count_if({cond})" for c, _, cond in rules)
        got = con.execute(f"SELECT {sel} FROM {t}").fetchall()[0]
        for i, (c, kind, _) in enumerate(rules):
            checked, ok = int(got[2 * i]), int(got[2 * i + 1])
            report["checks"].append({"column": c, "rule": kind, "checked": checked,
                                     "invalid": checked - ok,
                                     "validity": ok / checked if checked else None})
    if ds.privacy_unit and ds.privacy_unit in columns:
        u, k = _quote(ds.privacy_unit), ds.max_rows_per_unit
        units, within = con.execute(
            f"SELECT count(*), coalesce(sum(n) FILTER (WHERE n <= {k}), 0) FROM "
            f"(SELECT count(*) AS n FROM {t} WHERE {u} IS NOT NULL GROUP BY {u})").fetchall()[0]
        report["privacy_unit"] = {
            "column": ds.privacy_unit, "units": int(units), "max_rows_per_unit": k,
            "null_rows": int(report["columns"][ds.privacy_unit]["nulls"]),
            "rows_over_limit": rows - int(within) - report["columns"][ds.privacy_unit]["nulls"],
            "uniqueness": int(within) / rows if rows else 0.0,
            "in_score": ds.tier == "sensitive"}
    comps: dict[str, float | None] = {"completeness": None, "validity": None, "uniqueness": None}
    if rows and names:
        comps["completeness"] = sum(v["completeness"] for v in report["columns"].values()) / len(
            names)
        valid = [c["validity"] for c in report["checks"] if c["validity"] is not None]
        comps["validity"] = sum(valid) / len(valid) if valid else None
        pu = report["privacy_unit"]
        comps["uniqueness"] = pu["uniqueness"] if pu and pu["in_score"] else None
    present = [v for v in comps.values() if v is not None]
    report["components"] = comps
    report["score"] = _round_half_up(100 * sum(present) / len(present)) if present else 0
    return report


def published(report: dict[str, Any], tier: str) -> dict[str, Any]:
    """The report as the catalogue shows it, coarsened by tier (see the module docstring)."""
    coarse = tier == "sensitive"

    def pct(x: float | None) -> float | None:
        if x is None:
            return None
        return 5.0 * _round_half_up(100 * x / 5) if coarse else round(100 * x, 1)

    def count(n: int) -> str:
        if tier != "open" and 0 < n < 10:
            return "<10"
        return str(10 * _round_half_up(n / 10)) if coarse else str(n)

    comps = report["components"]
    pu = report.get("privacy_unit")
    fresh = report.get("freshness") or {}
    return {
        "score": 5 * _round_half_up(report["score"] / 5) if coarse else report["score"],
        "completeness_pct": pct(comps["completeness"]) or 0.0,
        "validity_pct": pct(comps["validity"]),
        "uniqueness_pct": pct(pu["uniqueness"]) if pu else None,
        "uniqueness_in_score": bool(pu and pu["in_score"]),
        "column_completeness_pct": {c: pct(v["completeness"])
                                    for c, v in report["columns"].items()},
        "checks": [{"column": c["column"], "rule": c["rule"], "valid_pct": pct(c["validity"]),
                    "invalid": count(c["invalid"])} for c in report["checks"]],
        "units_bucket": row_count_bucket(pu["units"]) if pu else "",
        "source_modified_at": fresh.get("source_modified_at") or "",
        "ingested_at": fresh.get("ingested_at") or "",
        "coarsened": coarse,
    }


def detect_pivots(columns: list[str], declared: tuple[str, ...] = ()) -> dict[str, str]:
    """Column -> pivot kind (school, year, level, area; "declared" for others declared)."""
    out = {}
    for col in columns:
        kind = next((k for k, names in PIVOT_NAMES.items() if col in names), None)
        if kind or col in declared:
            out[col] = kind or "declared"
    return out


def fill_table_info(info: pb.TableInfo, ds: DatasetConfig, report: dict[str, Any] | None
                    ) -> None:
    """Add the quality report and the pivot columns to a catalogue entry."""
    declared = ds.onboarding.pivots if ds.onboarding else ()
    for col, kind in detect_pivots([c.name for c in info.columns], declared).items():
        info.pivots[col] = kind
    if report is None:
        return
    p = published(report, ds.tier)
    q = info.quality
    q.score = p["score"]
    q.completeness_pct = p["completeness_pct"]
    if p["validity_pct"] is not None:
        q.validity_pct = p["validity_pct"]
    if p["uniqueness_pct"] is not None:
        q.uniqueness_pct = p["uniqueness_pct"]
    q.uniqueness_in_score = p["uniqueness_in_score"]
    for col, v in p["column_completeness_pct"].items():
        q.column_completeness_pct[col] = v
    for c in p["checks"]:
        check = q.checks.add(column=c["column"], rule=c["rule"], invalid=c["invalid"])
        if c["valid_pct"] is not None:
            check.valid_pct = c["valid_pct"]
    q.units_bucket = p["units_bucket"]
    q.source_modified_at = p["source_modified_at"]
    q.ingested_at = p["ingested_at"]
    q.coarsened = p["coarsened"]
