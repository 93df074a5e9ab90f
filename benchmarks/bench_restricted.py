"""Restricted tier by the cell key method (issue 11): accuracy and cost.

    .venv/bin/python benchmarks/bench_restricted.py                 # 10M synthetic rows
    .venv/bin/python benchmarks/bench_restricted.py --quick         # smoke run: 1M rows
    .venv/bin/python benchmarks/bench_restricted.py --sections b    # the profile only

A  Through a real federation (3 ``bulle node serve`` subprocesses, in-process
   ``Coordinator.run``), every table published three times from the same data: perturbed
   (``restricted``, the node's cell key method: arguments clamped to static bounds, noise
   scaled by them), exact (``restricted`` with ``cell_key = { perturb = false }``: the same
   per-unit SQL without the clamps, no noise step) and ``open`` (a plain one-level
   aggregation). Tables: UCI ``lycee_students`` split by school over n0/n1 and OULAD
   ``student_info`` split by module over n0/n1/n2 (as tests/conftest.py splits them;
   threshold 8, and the lycée's declared bounds, as in the demo; other numeric columns get
   the node's load-time envelopes), and synthetic rows (a person id with 2–3 rows each,
   categorical keys, numeric values; 2 nodes with half each; default parameters, k = 10).
   A1 relative error of every released value against the exact answer (the open table's,
   itself checked against one DuckDB over the union for the demo tables), median and 95th
   percentile per aggregate kind, and the share of cells suppressed ("< k").
   A2 time of the same query, interleaved (perturbed, exact, open, perturbed, …): ratio
   perturbed ÷ open (target ≤ 1.1) and perturbed ÷ exact (the clamps and the noise step),
   end to end and at the slowest node (its own engine time, from its audit chain).
B  In-process profile on one node's part of the synthetic data (DuckDB threads = 1, as a
   node; tables described as the node's engine describes them: load-time envelopes, most
   rows of a unit): the restricted SQL as compiled vs open, the per-unit GROUP BY alone,
   the same SQL without the static clamps, scratch variants of the cell-level SQL that
   release the same values (checked), EXPLAIN ANALYZE operator times, and cProfile of the
   release step (``release_restricted``), whose noise is checked against its static bounds.

Timing misses are reported, never asserted; exit status 1 only on a wrong answer (the open
tier differing from DuckDB on the demo tables, an unperturbed count above the open one, a
scratch variant releasing something else than the product code, or a released value moved
further than its static noise scale allows).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import math
import os
import pstats
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    DATA,
    ROOT,
    Dataset,
    cpu_info,
    federation,
    finish,
    fmt_s,
    load_avg,
    median,
    p95,
    time_interleaved,
    tree_info,
)

SHARED = Path(os.environ.get("BULLE_DATA") or ROOT.parent / "shared" / "data")
MODULES = (("AAA", "BBB", "CCC"), ("DDD", "EEE"), ("FFF", "GGG"))  # as tests/conftest.py
VARIANTS = {"perturbed": "", "exact": "_exact", "open": "_open"}
LYCEE_DOMAINS = {"school": ["GP", "MS"], "sex": ["F", "M"], "address": ["R", "U"],
                 "age": list(range(15, 23)), "studytime": [1, 2, 3, 4],
                 "failures": [0, 1, 2, 3], "higher": ["no", "yes"]}
# as the demo declares them (bulle_demo/nodes/region-*.toml): a SUM's noise scale; the
# other numeric columns get the power-of-two envelope the node derives at load
LYCEE_BOUNDS = {"g1": [0, 20], "g2": [0, 20], "g3": [0, 20]}  # as the demo declares them
OULAD_DOMAINS = {"final_result": ["Distinction", "Fail", "Pass", "Withdrawn"],
                 "gender": ["F", "M"], "age_band": ["0-35", "35-55", "55<="]}


@dataclass(frozen=True)
class Query:
    id: str
    title: str
    sql: str  # {t}: the table
    keys: tuple[str, ...]
    kinds: dict[str, str]  # output column -> count | sum | mean | sd | rate
    group: str = ""  # accuracy is pooled per table and group


def q(id_: str, title: str, sql: str, keys: tuple[str, ...], group: str = "",
      **kinds: str) -> Query:
    return Query(id_, title, sql, keys, kinds, group)


QUERIES: dict[str, list[Query]] = {
    "lycee_students": [
        q("L1", "count by 1 key", "SELECT sex, COUNT(*) AS n FROM {t} GROUP BY sex",
          ("sex",), n="count"),
        q("L2", "count by 2 keys", "SELECT age, studytime, COUNT(*) AS n FROM {t} "
          "GROUP BY age, studytime", ("age", "studytime"), n="count"),
        q("L3", "SUM/AVG/STDDEV by group", "SELECT address, SUM(absences) AS sum_absences, "
          "AVG(g3) AS avg_g3, STDDEV(g3) AS sd_g3 FROM {t} GROUP BY address", ("address",),
          sum_absences="sum", avg_g3="mean", sd_g3="sd"),
        q("L4", "pass rate by 2 keys", "SELECT school, sex, AVG(CASE WHEN g3 >= 10 THEN 1 "
          "ELSE 0 END) AS pass_rate FROM {t} GROUP BY school, sex", ("school", "sex"),
          pass_rate="rate"),
        q("L5", "count, AVG, STDDEV by a key with small cells", "SELECT failures, higher, "
          "COUNT(*) AS n, AVG(g3) AS avg_g3, STDDEV(absences) AS sd_absences FROM {t} "
          "GROUP BY failures, higher", ("failures", "higher"), n="count", avg_g3="mean",
          sd_absences="sd"),
    ],
    "student_info": [
        q("O1", "count by 1 key", "SELECT final_result, COUNT(*) AS n FROM {t} "
          "GROUP BY final_result", ("final_result",), n="count"),
        q("O2", "count by 2 keys", "SELECT code_module, final_result, COUNT(*) AS n FROM {t} "
          "GROUP BY code_module, final_result", ("code_module", "final_result"), n="count"),
        q("O3", "SUM/AVG/STDDEV by group", "SELECT age_band, SUM(studied_credits) AS "
          "sum_credits, AVG(studied_credits) AS avg_credits, STDDEV(studied_credits) AS "
          "sd_credits FROM {t} GROUP BY age_band", ("age_band",), sum_credits="sum",
          avg_credits="mean", sd_credits="sd"),
        q("O4", "pass rate by 2 keys", "SELECT code_module, gender, AVG(CASE WHEN final_result "
          "IN ('Pass', 'Distinction') THEN 1 ELSE 0 END) AS pass_rate FROM {t} "
          "GROUP BY code_module, gender", ("code_module", "gender"), pass_rate="rate"),
        q("O5", "count and AVG by 2 keys with small cells", "SELECT region, highest_education,"
          " COUNT(*) AS n, AVG(num_of_prev_attempts) AS avg_prev FROM {t} "
          "GROUP BY region, highest_education", ("region", "highest_education"), n="count",
          avg_prev="mean"),
    ],
    "synth": [
        q("S1", "count by 1 key", "SELECT region, COUNT(*) AS n FROM {t} GROUP BY region",
          ("region",), n="count"),
        q("S2", "count by 2 keys", "SELECT region, level, COUNT(*) AS n FROM {t} "
          "GROUP BY region, level", ("region", "level"), n="count"),
        q("S3", "SUM/AVG/STDDEV by group", "SELECT level, SUM(absences) AS sum_absences, "
          "AVG(score) AS avg_score, STDDEV(score) AS sd_score FROM {t} GROUP BY level",
          ("level",), sum_absences="sum", avg_score="mean", sd_score="sd"),
        q("S4", "pass rate by 2 keys", "SELECT region, sex, AVG(passed) AS pass_rate FROM {t} "
          "GROUP BY region, sex", ("region", "sex"), pass_rate="rate"),
        q("S5", "count and AVG by 2 keys, ~75k cells down to a few units",
          "SELECT district, level, COUNT(*) AS n, AVG(score) AS avg_score FROM {t} "
          "GROUP BY district, level", ("district", "level"), group="S5 (fine cells)",
          n="count", avg_score="mean"),
    ],
}


# -- data ----------------------------------------------------------------------------------
def gen_synthetic(rows: int) -> list[Path]:
    """``rows`` synthetic rows in 2 Parquet files (one per node), cached by size.

    ``pid`` (person): 2 or 3 consecutive rows each (2.5 on average), all at one node
    (``hash(pid) % 2``). Person-level: ``region`` (13), ``sex`` (2), ``district`` (1–14,999,
    log-uniform: ~70 rows in the smallest). Row-level: ``level`` (5), ``year`` (5),
    ``score`` DOUBLE in [0, 20) (normal, mean 11, sd 3.5, clipped), ``absences`` BIGINT
    (exponential, mean ~5.5), ``passed`` (score ≥ 10, 0/1).
    """
    out = DATA / f"restricted_{rows}"
    paths = [out / f"part{i}.parquet" for i in range(2)]
    if all(p.is_file() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"""CREATE TABLE src AS
        WITH r AS (SELECT range AS rid, (range * 2) // 5 AS pid FROM range({int(rows)})),
        s AS (SELECT rid, pid,
            'r' || lpad(CAST(hash(pid, 1) % 13 AS VARCHAR), 2, '0') AS region,
            CASE WHEN hash(pid, 2) % 2 = 0 THEN 'F' ELSE 'M' END AS sex,
            'L' || CAST(1 + hash(rid, 3) % 5 AS VARCHAR) AS level,
            CAST(2019 + hash(rid, 4) % 5 AS BIGINT) AS year,
            CAST(floor(pow(15000.0, (hash(pid, 5) % 1000000) / 1000000.0)) AS BIGINT)
                AS district,
            least(19.99, greatest(0.0, 11.0 + 3.5 * sqrt(-2 * ln((hash(rid, 6) % 1000000 + 1)
                / 1000001.0)) * cos(2 * pi() * (hash(rid, 7) % 1000000) / 1000000.0)))
                AS score,
            CAST(floor(-6.0 * ln((hash(rid, 8) % 1000000 + 1) / 1000001.0)) AS BIGINT)
                AS absences,
            CAST(hash(pid, 9) % 2 AS INTEGER) AS node
            FROM r)
        SELECT *, CAST(score >= 10 AS INTEGER) AS passed FROM s""")
    for i, p in enumerate(paths):
        tmp = p.with_suffix(".tmp")
        con.execute(f"COPY (SELECT * EXCLUDE (node) FROM src WHERE node = {i}) TO '{tmp}' "
                    "(FORMAT parquet)")
        tmp.rename(p)
    con.close()
    return paths


def datasets(synth: list[Path]) -> list[Dataset]:
    from privacy import CkmParams

    por = SHARED / "uci-student-performance" / "student-por.csv"
    info = SHARED / "oulad" / "studentInfo.csv"
    families = [
        ("lycee_students", [por, por], ["school = 'GP'", "school = 'MS'"],
         {"min_count": 8, "public_domains": LYCEE_DOMAINS, "bounds": LYCEE_BOUNDS}, {}),
        ("student_info", [info] * 3,
         ["code_module IN (" + ", ".join(f"'{m}'" for m in mods) + ")" for mods in MODULES],
         {"min_count": 8, "public_domains": OULAD_DOMAINS}, {"privacy_unit": "id_student"}),
        ("synth", synth, ["", ""], {"min_count": 10}, {"privacy_unit": "pid"}),
    ]
    d = CkmParams()  # the node's defaults (magnitude 0.5 since static bounds), as the demo
    perturbed = {"max_perturbation": d.max_perturbation, "variance": d.variance,
                 "magnitude": d.magnitude}
    out = []
    for table, sources, filters, restricted, common in families:
        for variant, suffix in VARIANTS.items():
            kw: dict[str, Any] = dict(common)
            if variant == "open":
                kw["tier"] = "open"
            else:
                kw.update(restricted)
                kw["cell_key"] = {"perturb": False} if variant == "exact" else perturbed
            out.append(Dataset(table + suffix, sources, filters=filters, **kw))
    return out


def union_db() -> duckdb.DuckDBPyConnection:
    """The demo tables whole, in one DuckDB, loaded as a node loads them."""
    from nodes._config import DatasetConfig
    from nodes._sources import load_dataset

    con = duckdb.connect()
    for table, path in (("lycee_students", SHARED / "uci-student-performance" /
                         "student-por.csv"), ("student_info", SHARED / "oulad" /
                                              "studentInfo.csv")):
        load_dataset(con, DatasetConfig(table=table, source=(path,), tier="open"))
    return con


# -- accuracy ------------------------------------------------------------------------------
def cells(result: dict[str, Any], keys: tuple[str, ...]) -> dict[tuple[Any, ...], dict]:
    names = [c["name"] for c in result["columns"]]
    out = {}
    for row in result["rows"]:
        d = dict(zip(names, row, strict=True))
        out[tuple(d[k] for k in keys)] = d
    return out


@dataclass
class Accuracy:
    """Errors of one group of queries, per aggregate kind."""

    cells: int = 0  # cells of the exact answer
    suppressed: int = 0  # of those, "< k" (or absent) in the perturbed answer
    exact_released: int = 0  # released by the unperturbed tier (same threshold rule)
    partial: int = 0  # of those, a value ≠ the exact answer: a node's part was left out
    errors: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    signed: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    noise: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rate_pp: list[float] = field(default_factory=list)

    def add(self, query: Query, truth: dict, got: dict, exact: dict) -> None:
        """``truth``: the open table's answer; ``got``: the perturbed tier's; ``exact``: the
        unperturbed restricted tier's (threshold applied, no noise)."""
        for key, t in truth.items():
            self.cells += 1
            g, e = got.get(key), exact.get(key)
            if e is not None and all(e[c] is not None for c in query.kinds):
                self.exact_released += 1
                if any(t[c] is not None and not math.isclose(
                        float(e[c]), float(t[c]), rel_tol=1e-9, abs_tol=1e-9)
                       for c in query.kinds):
                    self.partial += 1
            else:
                e = None
            if g is None or any(g[c] is None for c in query.kinds):
                self.suppressed += 1
                continue
            for col, kind in query.kinds.items():
                if t[col] is None:
                    continue
                tv, gv = float(t[col]), float(g[col])
                if kind == "rate":
                    self.rate_pp.append(100 * abs(gv - tv))
                if tv != 0:
                    self.errors[kind].append(abs(gv - tv) / abs(tv))
                    self.signed[kind].append((gv - tv) / abs(tv))
                if e is not None and float(e[col]) != 0:  # the noise alone
                    self.noise[kind].append(abs(gv - float(e[col])) / abs(float(e[col])))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cells": self.cells, "suppressed": self.suppressed,
            "exact_released": self.exact_released, "partial": self.partial,
            "kinds": {k: {"n": len(v), "median": median(v), "p95": p95(v), "max": max(v),
                          "mean_signed": statistics.fmean(self.signed[k]),
                          "noise_median": median(self.noise[k]) if self.noise[k] else None,
                          "noise_p95": p95(self.noise[k]) if self.noise[k] else None}
                      for k, v in self.errors.items()}}
        if self.rate_pp:
            out["rate_abs_pp"] = {"median": median(self.rate_pp), "p95": p95(self.rate_pp),
                                  "max": max(self.rate_pp)}
        return out


def same_cells(a: dict, b: dict, cols: list[str]) -> str | None:
    """None if every cell of ``b`` that holds values equals ``a``'s (1e-9 relative)."""
    for key, bv in b.items():
        if any(bv[c] is None for c in cols):
            continue
        av = a.get(key)
        if av is None:
            return f"cell {key} missing"
        for c in cols:
            if not math.isclose(float(av[c]), float(bv[c]), rel_tol=1e-9, abs_tol=1e-9):
                return f"cell {key} {c}: {bv[c]!r} != {av[c]!r}"
    return None


def counts_at_most(truth: dict, exact: dict, query: Query) -> str | None:
    """The unperturbed tier may leave a node's part out, never add: its counts ≤ the truth."""
    for key, e in exact.items():
        for col, kind in query.kinds.items():
            if kind == "count" and e[col] is not None:
                t = truth.get(key, {}).get(col)
                if t is None or e[col] > t:
                    return f"cell {key} {col}: {e[col]!r} > {t!r}"
    return None


def pct(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.3g} %" if x >= 1e-4 or x == 0 else f"{100 * x:.1e} %"


# -- section A -----------------------------------------------------------------------------
def section_a(args: argparse.Namespace, synth: list[Path], details: dict[str, Any],
              failures: list[str]) -> None:
    truth_db = union_db()
    t = time.perf_counter()
    with federation(datasets(synth), threads=1, http=False, memory_limit="4GB",
                    coordinator_options={"node_timeout_s": 600.0}) as fed:
        up = time.perf_counter() - t
        print(f"3 nodes up in {up:.1f} s (each restricted table: load, record keys = "
              f"SHA-256 per row, max rows per unit); load average {load_avg()}", flush=True)
        details["nodes_up_s"] = up
        coord, who = fed.coordinator, fed.researcher
        groups: dict[str, Accuracy] = {}
        time_rows = []
        for family, queries in QUERIES.items():
            synthetic = family == "synth"
            runs = args.synth_runs if synthetic else args.runs
            warmup = args.synth_warmup if synthetic else 1
            for query in queries:
                sqls = {v: query.sql.format(t=family + s) for v, s in VARIANTS.items()}
                off = {nid: len(fed.released_entries(nid)) for nid in fed.node_ids}
                times, res = time_interleaved(
                    {v: (lambda s=s: coord.run(s, who)) for v, s in sqls.items()}, runs,
                    warmup=warmup)
                node = node_times(fed, off, family)
                truth = cells(res["open"], query.keys)
                got = cells(res["perturbed"], query.keys)
                exact = cells(res["exact"], query.keys)
                cols = list(query.kinds)
                why = counts_at_most(truth, exact, query)
                if why:
                    failures.append(f"{query.id} exact tier above the open one: {why}")
                if not synthetic:  # the open tier against one DuckDB over the union
                    ref = truth_db.execute(query.sql.format(t=family)).fetchall()
                    names = [c["name"] for c in res["open"]["columns"]]
                    one = {tuple(dict(zip(names, r, strict=True))[k] for k in query.keys):
                           dict(zip(names, r, strict=True)) for r in ref}
                    why = same_cells(one, truth, cols) or (
                        None if len(one) == len(truth) else f"{len(truth)} cells, "
                        f"DuckDB {len(one)}")
                    if why:
                        failures.append(f"{query.id} open tier vs DuckDB: {why}")
                one_query = Accuracy()
                one_query.add(query, truth, got, exact)
                label = family + (f" {query.group}" if query.group else "")
                groups.setdefault(label, Accuracy()).add(query, truth, got, exact)
                acc = one_query.summary()
                med = {v: median(ts) for v, ts in times.items()}
                row = {"query": query.id, "title": query.title, "sql": sqls["perturbed"],
                       "runs": runs, "warmup": warmup, "accuracy": acc,
                       "median_s": med, "times_s": times, "node_ms": node,
                       "ratio_open": med["perturbed"] / med["open"],
                       "ratio_exact": med["perturbed"] / med["exact"]}
                if all(node.get(v) for v in VARIANTS):
                    row["node_ratio_open"] = node["perturbed"] / node["open"]
                    row["node_ratio_exact"] = node["perturbed"] / node["exact"]
                time_rows.append(row)
                errs = ", ".join(f"{k} {pct(v['median'])} / {pct(v['p95'])}"
                                 for k, v in acc["kinds"].items())
                print(f"{query.id} {query.title}: {acc['cells']} cells, {acc['suppressed']} "
                      f"suppressed, {acc['partial']} with a node's part left out; rel. error "
                      f"median / p95: {errs or '—'}; time perturbed {fmt_s(med['perturbed'])}, "
                      f"exact {fmt_s(med['exact'])}, open {fmt_s(med['open'])} → "
                      f"×{row['ratio_open']:.2f} vs open, ×{row['ratio_exact']:.2f} vs exact; "
                      f"slowest node's engine ms {node}", flush=True)
        acc_rows = [{"group": g, **a.summary()} for g, a in groups.items()]
        details["accuracy"], details["timing"] = acc_rows, time_rows
    truth_db.close()
    print_a(acc_rows, time_rows)


def node_times(fed: Any, off: dict[str, int], family: str) -> dict[str, float]:
    """Per variant: the slowest node's median engine time (ms) since ``off``."""
    out: dict[str, float] = {}
    for variant, suffix in VARIANTS.items():
        table = family + suffix
        per_node = []
        for nid in fed.node_ids:
            ms = [d["ms"] for d in fed.released_entries(nid)[off[nid]:]
                  if d.get("tables") == [table] and "ms" in d]
            if ms:
                per_node.append(median(ms))
        if per_node:
            out[variant] = round(max(per_node), 2)
    return out


def print_a(acc_rows: list[dict], time_rows: list[dict]) -> None:
    print("\nA1. Relative error of the perturbed restricted tier vs the exact answer (the "
          "open table's), per aggregate kind, over released cells whose exact value ≠ 0; "
          "'noise alone': vs the unperturbed restricted tier (same threshold rule):")
    print("| table | kind | values | median | p95 | max | mean signed | noise alone: median "
          "| p95 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a in acc_rows:
        for kind, k in a["kinds"].items():
            print(f"| {a['group']} | {kind} | {k['n']} | {pct(k['median'])} | "
                  f"{pct(k['p95'])} | {pct(k['max'])} | {100 * k['mean_signed']:+.2g} % | "
                  f"{pct(k['noise_median'])} | {pct(k['noise_p95'])} |")
    print("\nCells of the exact answer suppressed (\"< k\") by the perturbed tier; released "
          "by the unperturbed tier with a node's part left out (part < k at that node); "
          "pass rates' absolute error:")
    for a in acc_rows:
        extra = ""
        if "rate_abs_pp" in a:
            r = a["rate_abs_pp"]
            extra = (f"; rates |error| median {r['median']:.2f} pp, p95 {r['p95']:.2f} pp, "
                     f"max {r['max']:.2f} pp")
        print(f"  {a['group']}: suppressed {a['suppressed']} of {a['cells']} cells "
              f"({pct(a['suppressed'] / max(1, a['cells']))}); part left out {a['partial']} of "
              f"{a['exact_released']} released ({pct(a['partial'] / max(1, a['exact_released']))})"
              f"{extra}")
    print("\nA2. Time, Coordinator.run, medians (interleaved) and the slowest node's own "
          "engine time:")
    print("| query | cells | runs | perturbed | exact | open | ×open | ×exact | node ms p/e/o | "
          "node ×open | node ×exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in time_rows:
        m, n = r["median_s"], r["node_ms"]
        nodes = "/".join(f"{n.get(v, float('nan')):.0f}" for v in VARIANTS)
        print(f"| {r['query']} | {r['accuracy']['cells']} | {r['runs']} | "
              f"{fmt_s(m['perturbed'])} | {fmt_s(m['exact'])} | {fmt_s(m['open'])} | "
              f"{r['ratio_open']:.2f} | {r['ratio_exact']:.2f} | {nodes} | "
              f"{r.get('node_ratio_open', float('nan')):.2f} | "
              f"{r.get('node_ratio_exact', float('nan')):.2f} |")


# -- section B: profile --------------------------------------------------------------------
_MOD = 1 << 32


def _released(table: pa.Table, release: Any) -> pa.Table:
    from nodes._restricted import release_restricted
    from privacy import ptable_for

    return release_restricted(table, release, ptable_for(release.params))[0]


def _rows(table: pa.Table) -> list[str]:
    """A release's rows in a fixed order (cells come in the hash aggregate's order)."""
    return sorted(repr(row) for row in table.to_pylist())


def _inner(sql: str) -> str:
    """The units (or rows) subquery of a restricted cell SQL: its ``__c{i}`` columns are
    each unit's contributions."""
    return sql[sql.index(" FROM (") + len(" FROM ("):sql.rindex(") AS __units")]


def _sub(sql: str, pattern: str, repl: str, applied: list[str]) -> str:
    out, n = re.subn(pattern, repl, sql)
    if n:
        applied.append(repl)
    return out


def what_if(sql: str, aggs: list[Any], *, static_counts: bool = False,
            bigint_rk: bool = False, value_key_residues: bool = False) -> str | None:
    """The product's cell SQL with cheaper, equivalent cell columns (None: nothing applies).

    ``static_counts``: columns a COUNT(*)'s contributions fix in advance: every unit adds
    ≥ 1 (clamped to [0, most rows of a unit] ≥ 1), so its contributors and key are the
    cell's (``count(*)``, ``sum(__rk)``) without the ``FILTER (WHERE c <> 0)``.
    ``bigint_rk``: the record key read as BIGINT (``CAST(__bulle_rk AS BIGINT)``): its sums
    stay below 2⁶³ for < 2³¹ units and DuckDB may sum them on int64 instead of HUGEINT;
    ``hash`` of a non-negative BIGINT equals that of the same UINTEGER, so the value keys
    do not move.
    ``value_key_residues``: a magnitude's value key ``sum(hash(rk, c)) % 2³²`` as the sum
    of each hash's low 32 bits (a UINTEGER), the same residue: (Σ h) mod 2³² =
    (Σ (h mod 2³²)) mod 2³², exact since both sums are exact integers.
    Every what-if is checked to release exactly what the product releases.
    """
    from federation.proto import bulle_pb2 as pb

    applied: list[str] = []
    if bigint_rk:
        sql = _sub(sql, r'("[^"]+"\."__bulle_rk") AS __rk\b', r"CAST(\1 AS BIGINT) AS __rk",
                   applied)
    for i, a in enumerate(aggs):
        c, nz = f"__c{i}", rf"FILTER \(WHERE __c{i} <> 0\)"
        if static_counts and a.kind == pb.COUNT_ROWS:
            sql = _sub(sql, rf"count\(\*\) {nz} AS __n{i}\b", f"count(*) AS __n{i}", applied)
            sql = _sub(sql, rf"coalesce\(sum\(__rk\) {nz} % {_MOD}, 0\) AS __k{i}\b",
                       f"sum(__rk) % {_MOD} AS __k{i}", applied)
        if value_key_residues and not a.count_like:
            sql = _sub(sql, rf"sum\(hash\(__rk, CAST\({c} AS DOUBLE\)\)\) (FILTER \(WHERE {c} "
                       rf"IS NOT NULL\)) % {_MOD}, 0\) AS __v{i}\b",
                       f"sum(CAST(hash(__rk, CAST({c} AS DOUBLE)) & {_MOD - 1} AS UINTEGER)) "
                       rf"\1 % {_MOD}, 0) AS __v{i}", applied)
    return sql if applied else None


def _select_items(sql: str) -> tuple[str, list[str], str]:
    """(``SELECT ``, the outer select list split at top-level commas, the rest)."""
    head = "SELECT "
    end = sql.index(" FROM (")
    items, depth, start = [], 0, len(head)
    for i in range(len(head), end):
        ch = sql[i]
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(sql[start:i].strip())
            start = i + 1
    items.append(sql[start:end].strip())
    return head, items, sql[end:]


CELL_CLASSES = {
    "__n{i}": "contributing units: count(*) FILTER (c <> 0)",
    "__k{i}": "their cell key: sum(rk) FILTER (c <> 0 | NOT NULL) % 2^32",
    "__v{i}": "value key: sum(hash(rk, c)) FILTER (c NOT NULL) % 2^32",
}


def without_class(sql: str, pattern: str, n: int) -> str:
    """The cell SQL with one class of cell columns (for every aggregate) replaced by NULL:
    what that class costs (attribution only, not a release)."""
    head, items, rest = _select_items(sql)
    names = {pattern.format(i=i) for i in range(n)}
    items = [f"NULL AS {it.rsplit(' AS ', 1)[1]}" if it.rsplit(" AS ", 1)[-1] in names else it
             for it in items]
    return head + ", ".join(items) + rest


def _flatten(op: dict, depth: int, out: list[tuple[int, str, float, int, str]]) -> None:
    info = op.get("extra_info") or {}
    what = ""
    if isinstance(info, dict):
        groups, aggs = info.get("Groups"), info.get("Aggregates")
        if groups:
            what = f"groups {groups if isinstance(groups, str) else ', '.join(groups)}"
        if aggs:
            n = len(aggs) if isinstance(aggs, list) else aggs.count("\n") + 1
            what += f"; {n} aggregates"
    out.append((depth, op.get("type", op.get("operator_type", "?")),
                float(op.get("timing", op.get("operator_timing", 0.0))),
                int(op.get("intermediate_rows", op.get("operator_cardinality", 0))), what))
    for child in op.get("children", []):
        _flatten(child, depth + 1, out)


def explain_analyze(con: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
    """DuckDB's EXPLAIN ANALYZE (JSON), one line per operator taking ≥ 0.5 ms."""
    row = con.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").fetchall()[0]
    doc = json.loads(row[-1])
    ops: list[tuple[int, str, float, int, str]] = []
    roots = doc.get("operator") if isinstance(doc, dict) else doc
    for op in roots if isinstance(roots, list) else [roots]:
        _flatten(op, 0, ops)
    shown = [o for o in ops if o[2] >= 0.0005]
    total = sum(o[2] for o in ops) or 1.0
    top = min((o[0] for o in shown), default=0)
    return [f"{'  ' * (d - top)}{name:<14} {t * 1000:8.1f} ms {100 * t / total:5.1f} % "
            f"{rows:>10,} rows  {what}" for d, name, t, rows, what in shown]


def section_b(args: argparse.Namespace, synth: list[Path], details: dict[str, Any],
              failures: list[str]) -> None:
    import inspect

    import nodes._compile as nc
    from federation._planner import plan_query
    from federation._sql import parse
    from nodes._compile import TableMeta, compile_plan
    from privacy import CkmParams

    con = duckdb.connect(config={"threads": 1, "disabled_optimizers": "common_subexpressions"})
    # the node's record key is SHA-256(secret, unit); any 32-bit value of the unit times alike
    con.execute(f"CREATE TABLE synth AS SELECT *, CAST(hash(pid, 7) % {_MOD} AS UINTEGER) AS "
                f"__bulle_rk FROM read_parquet('{synth[0]}') LIMIT {int(args.profile_rows)}")
    con.execute("CREATE VIEW synth_rows AS SELECT * FROM synth")
    con.execute("CREATE VIEW synth_open AS SELECT * FROM synth")
    n, units = con.execute("SELECT count(*), count(DISTINCT pid) FROM synth").fetchone()
    columns = {r[0]: r[1] for r in con.execute("DESCRIBE synth").fetchall()
               if r[0] != "__bulle_rk"}
    ckm = CkmParams(threshold=10)
    # as the node's engine builds them at load (nodes/_disclosure.py): no declared bounds, so
    # every numeric column gets its power-of-two envelope (the noise scale of a SUM), and
    # the most rows one unit has (the per-unit clamp and the count's scale)
    from nodes._config import DatasetConfig
    from nodes._disclosure import envelopes, max_unit_rows

    bounds = envelopes(con, "synth", columns)
    most = max_unit_rows(con, DatasetConfig(table="synth", source=(synth[0],),
                                             tier="restricted", privacy_unit="pid"))
    meta = {
        # as a node holds it: unit = pid, 2-3 rows per unit → per-unit GROUP BY
        "synth": TableMeta("synth", "restricted", columns, "pid", {}, 10, 1, dict(bounds),
                           max_unit_rows=most, ckm=ckm),
        # the same rows, each row its own unit → one aggregation level
        "synth_rows": TableMeta("synth_rows", "restricted", columns, "", {}, 10, 1,
                                dict(bounds), ckm=ckm),
        "synth_open": TableMeta("synth_open", "open", columns, "", {}, 0, 1, dict(bounds)),
    }
    schema = {name: dict(m.columns) for name, m in meta.items()}
    captured: list[dict[str, Any]] = []
    product_sql = nc.restricted_sql
    signature = inspect.signature(product_sql)

    def capture(*a: Any, **kw: Any) -> str:
        captured.append(dict(signature.bind(*a, **kw).arguments))
        return product_sql(*a, **kw)

    exact = {name: dataclasses.replace(m, perturb=False) for name, m in meta.items()}

    def plan_of(sql: str, table: str, exact_release: bool = False) -> Any:
        return compile_plan(plan_query(parse(sql.format(t=table), schema)).plan,
                            exact if exact_release else meta, 10**6)

    nc.restricted_sql = capture  # read-only: records the arguments, returns the product's SQL
    try:
        print(f"\nB. Profile in-process: synthetic part 0, {n:,} rows ({units:,} units), "
              f"DuckDB threads = 1; {args.profile_runs} interleaved runs after 1 warm-up")
        prof: dict[str, Any] = {"rows": n, "units": units}
        by_id = {x.id: x for x in QUERIES["synth"]}
        for qid in args.profile_queries.split(","):
            query = by_id[qid]
            variants: dict[str, str] = {"open (as compiled)": plan_of(query.sql,
                                                                     "synth_open").sql}
            checks: dict[str, Any] = {}
            for table, label in (("synth_rows", "1 row/unit"), ("synth", "2-3 rows/unit")):
                captured.clear()
                c = plan_of(query.sql, table)
                a = captured[-1]
                inner = _inner(c.sql)
                variants[f"restricted, {label} (as compiled)"] = c.sql
                if a["per_unit"]:
                    variants[f"  {label}: per-unit GROUP BY alone"] = (
                        f"SELECT count(*) FROM ({inner})")
                # attribution only (exact values, not checked): the same SQL without the
                # static clamps, as a node compiles it with perturb = false (the exact tier)
                unclamped = plan_of(query.sql, table, exact_release=True).sql
                if unclamped != c.sql:
                    variants[f"  {label}: without the clamps (as perturb = false)"] = unclamped
                if a["per_unit"] and qid in args.attribute.split(","):
                    for pattern, what in CELL_CLASSES.items():
                        variants[f"  {label}: without {pattern.format(i='i')} ({what})"] = (
                            without_class(c.sql, pattern, len(a["aggs"])))
                alone = [("static COUNT(*) columns", {"static_counts": True}),
                         ("record key as BIGINT", {"bigint_rk": True}),
                         ("value key as 32-bit residues", {"value_key_residues": True})]
                every = ("static + BIGINT key + residues", {"static_counts": True,
                                                            "bigint_rk": True,
                                                            "value_key_residues": True})
                # each what-if alone on the one-level SQL, all together on both shapes
                for name, kw in ([] if a["per_unit"] else alone) + [every]:
                    sql = what_if(c.sql, a["aggs"], **kw)
                    if sql is not None and sql not in variants.values():
                        variants[f"  {label}: {name}"] = sql
                        checks[f"  {label}: {name}"] = c
            times, results = time_interleaved(
                {k: (lambda s=s: con.sql(s).to_arrow_table()) for k, s in variants.items()},
                args.profile_runs, warmup=1)
            # on a shared machine the fastest run is the steadier figure; medians kept too
            base = min(times["open (as compiled)"])
            print(f"\n B1 {qid} ({query.title}): {query.sql.format(t='T')}  "
                  "[min (median) of the runs]")
            out = {}
            for k, ts in times.items():
                m = min(ts)
                out[k] = {"min_s": m, "median_s": median(ts)}
                print(f"   {k:<48.100} {m * 1000:8.1f} ({median(ts) * 1000:.1f}) ms "
                      f"×{m / base:5.2f} open")
            for k, c in checks.items():  # a what-if must release exactly the same values
                product = _rows(_released(con.sql(c.sql).to_arrow_table(), c.restricted))
                if _rows(_released(results[k], c.restricted)) != product:
                    failures.append(f"B {qid} {k.strip()}: releases different values")
            prof[qid] = out
            print(f"\n B2 {qid}: EXPLAIN ANALYZE of the restricted SQL, 2-3 rows/unit:")
            lines = explain_analyze(con, plan_of(query.sql, "synth").sql)
            for line in lines:
                print("   " + line)
            prof[f"{qid}_explain"] = lines
        details["profile"] = prof
        release_profile(con, plan_of, details, failures)
    finally:
        nc.restricted_sql = product_sql
        con.close()


def release_profile(con: duckdb.DuckDBPyConnection, plan_of: Any, details: dict[str, Any],
                    failures: list[str]) -> None:
    """cProfile of release_restricted on the cells of S5 (many) and S3 (few), and a check
    that each released value moved by no more than its static noise scale allows."""
    print("\n B3 release step (release_restricted), cells as the node's SQL returns them:")
    out = {}
    for qid in ("S3", "S5"):
        query = next(x for x in QUERIES["synth"] if x.id == qid)
        c = plan_of(query.sql, "synth")
        cells_t = con.sql(c.sql).to_arrow_table()
        decimals = [f.name for f in cells_t.schema if pa.types.is_decimal(f.type)]
        runs = 5
        as_is, released = median_time(lambda t=cells_t, c=c: _released(t, c.restricted), runs)
        unperturbed = dataclasses.replace(c.restricted, perturb=False)
        exact_ms, exact = median_time(lambda t=cells_t, r=unperturbed: _released(t, r), runs)
        why, worst = noise_within_scale(released, exact, c.restricted)
        if why:
            failures.append(f"B3 {qid}: {why}")
        pr = cProfile.Profile()
        pr.enable()
        _released(cells_t, c.restricted)
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(6)
        top = [ln for ln in buf.getvalue().splitlines() if re.match(r"\s+\d", ln)][:6]
        print(f"   {qid}: {cells_t.num_rows:,} cells, {len(decimals)} DECIMAL(38,0) columns "
              f"from DuckDB HUGEINT ({', '.join(decimals[:6])}{'…' if len(decimals) > 6 else ''}"
              f", cast to int64 in Arrow by _ints): release {as_is * 1000:.2f} ms "
              f"({exact_ms * 1000:.2f} ms with perturb = false); largest |noise| ÷ its "
              f"bound (μ·B·1.5, D·B) per part: "
              f"{', '.join(f'{k} {v:.2f}' for k, v in worst.items()) or '—'}; "
              "cProfile, by own time:")
        for ln in top:
            print("     " + ln.strip())
        out[qid] = {"cells": cells_t.num_rows, "release_ms": as_is * 1000,
                    "release_ms_unperturbed": exact_ms * 1000,
                    "noise_over_bound_max": worst, "top": top}
    details["release_profile"] = out


def noise_within_scale(perturbed: pa.Table, exact: pa.Table, release: Any
                       ) -> tuple[str | None, dict[str, float]]:
    """Whether every value released by both moved within its static bound: a count by at
    most D × B (the ptable's largest draw), a magnitude by μ × B × [0.5, 1.5] (B the most
    one unit adds, ``release.noise``), ±0.5 where the value is rounded to an integer.
    Also the largest |noise| ÷ bound per aggregate."""
    from nodes._restricted import COUNT_KINDS, ORDER_KINDS
    from privacy._ckm import MAGNITUDE_HIGH, MAGNITUDE_LOW

    keys = list(release.group_names)
    exact_cells = {tuple(r[g] for g in keys): r for r in exact.to_pylist()}
    params, worst = release.params, {}
    for i, (name, kind) in enumerate(release.aggregates):
        if kind in ORDER_KINDS:  # min/max of institutions: released as they are
            continue
        scale, count_like = release.noise_of(i)
        integral = pa.types.is_integer(perturbed.schema.field(name).type)
        slack = 0.5 if integral else 1e-9 * scale
        if count_like or kind in COUNT_KINDS:
            low, high = 0.0, params.max_perturbation * scale
        else:
            low, high = (params.magnitude * scale * MAGNITUDE_LOW,
                         params.magnitude * scale * MAGNITUDE_HIGH)
        worst[name] = 0.0
        for row in perturbed.to_pylist():
            e = exact_cells.get(tuple(row[g] for g in keys))
            if e is None or row[name] is None or e[name] is None:
                continue
            noise = abs(float(row[name]) - float(e[name]))
            worst[name] = max(worst[name], noise / high if high else 0.0)
            if not low - slack <= noise <= high + slack:
                return (f"cell {row} {name}: moved {noise:g}, bound [{low:g}, {high:g}]",
                        worst)
    return None, worst


def median_time(fn: Any, runs: int) -> tuple[float, Any]:
    result = fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        ts.append(time.perf_counter() - t)
    return median(ts), result


# -- main ------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="synthetic rows, 2 nodes")
    ap.add_argument("--runs", type=int, default=7, help="timed runs per variant, demo tables")
    ap.add_argument("--synth-runs", type=int, default=3,
                    help="timed runs per variant, synthetic table (each takes seconds)")
    ap.add_argument("--synth-warmup", type=int, default=0,
                    help="untimed runs first, synthetic table (its data is in memory already)")
    ap.add_argument("--profile-rows", type=int, default=500_000,
                    help="rows of node n0's synthetic part profiled in section B")
    ap.add_argument("--profile-runs", type=int, default=7)
    ap.add_argument("--profile-queries", default="S1,S3")
    ap.add_argument("--attribute", default="S3",
                    help="queries whose cell columns are attributed class by class")
    ap.add_argument("--sections", default="ab")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1M synthetic rows, 3 runs, 200k rows profiled")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.runs, args.synth_runs, args.synth_warmup = 1_000_000, 3, 2, 1
        args.profile_rows, args.profile_runs = 200_000, 5
    args.json = args.json or DATA / f"last_results_restricted_{args.rows}.json"
    started = time.perf_counter()
    synth = gen_synthetic(args.rows)
    print(f"synthetic data ready in {time.perf_counter() - started:.1f} s ({args.rows:,} rows, "
          f"{DATA / f'restricted_{args.rows}'}); {cpu_info()}; code: {tree_info()}; "
          f"load average {load_avg()}", flush=True)
    details: dict[str, Any] = {"rows": args.rows, "machine": cpu_info(), "code": tree_info(),
                               "load_avg_start": load_avg(), "args": vars(args)}
    failures: list[str] = []
    if "a" in args.sections:
        section_a(args, synth, details, failures)
    if "b" in args.sections:
        section_b(args, synth, details, failures)
    details["load_avg_end"] = load_avg()
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average start "
          f"{details['load_avg_start']}, end {details['load_avg_end']}")
    return finish(details, failures, args.json,
                  "open tier = DuckDB on the demo tables, unperturbed counts ≤ open ones; "
                  "what-ifs release the same values; noise within its static bounds")


if __name__ == "__main__":
    sys.exit(main())
