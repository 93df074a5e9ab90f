"""Scale benchmark (issue 13): federations of 2, 6 and 30 nodes against one DuckDB.

    .venv/bin/python benchmarks/bench_scale.py [--rows N] [--nodes 2,6,30] [--runs N]

Data: the project's own synthetic DNB pupils (``generate``), calibrated on the real files in
``../shared/data`` (Licence Ouverte v2.0, DEPP): every collège of the IVAC 2023 session
with its number of candidates (scaled to ``--rows``), académie, sector and mean written
mark, and its IPS mean and standard deviation from the IPS collèges 2022 file. Each pupil
gets a sex, an IPS drawn around the collège's and a written mark around the collège's mean
that rises with the pupil's IPS. Written at run time, one Parquet file per académie, into a
temporary folder (removed at the end); nothing is copied into the repository.

Per federation (académies dealt to nodes round-robin; nodes are real ``bulle node serve``
subprocesses, ``threads = 1``, mutual TLS, see ``_harness.py``), each query runs interleaved
with the same SQL over one plain DuckDB reading all the Parquet files (default threads):

Q1  count by académie
Q2  mean written-exam mark by académie
Q3  count and mean by académie × sector × sex for IPS < 100

in the exact tier (restricted, ``min_count = 0``, ``cell_key = {perturb = false}``: answers
checked equal to DuckDB's) and the DP tier at ε = 1 (sensitive, one row per pupil: answers
checked complete — every group, no NULL — and their relative error reported, beside the
reported noise sd ÷ the true value as released (every node adds its own noise, so the sd of
a federated sum grows as √nodes) and as secure aggregation with distributed noise would give
it (one noise on the total: that sd ÷ √nodes, the one-node level)). Reported:
wall ratio fed ÷ DuckDB, CPU ratio (CPU of every process involved: this process, which runs
DuckDB or the coordinator, plus every node, from /proc via psutil), DP ÷ exact, node RSS at
start and under load (and each node's peak, VmHWM, which includes loading). T0: a 3-node
query on a 1,000-row table through the HTTP API (a ``bulle coordinator serve`` subprocess),
its median and p95 and the CPU-ms per query of the nodes, the coordinator and this client.
Also: a node's imports (time and RSS before any data). Timing misses are reported, never
asserted; a wrong answer makes the script exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from _harness import (
    CHILD_ENV,
    DATA,
    PY,
    ROOT,
    TOKEN,
    Dataset,
    cpu_info,
    fmt_s,
    load_avg,
    median,
    tree_info,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IVAC = SHARED / "fr-ivac-colleges" / "fr-en-indicateurs-valeur-ajoutee-colleges.csv"
IPS = SHARED / "fr-ips" / "fr-en-ips-colleges-ap2022.csv"
EPSILON = 1.0
QUERIES = {
    "Q1 count by académie":
        "SELECT academie, COUNT(*) AS n FROM {t} GROUP BY academie ORDER BY academie",
    "Q2 mean mark by académie":
        "SELECT academie, AVG(note_ecrit) AS m FROM {t} GROUP BY academie ORDER BY academie",
    "Q3 académie × sector × sex, IPS < 100":
        ("SELECT academie, secteur, sexe, COUNT(*) AS n, AVG(note_ecrit) AS m FROM {t} "
         "WHERE ips < 100 GROUP BY academie, secteur, sexe ORDER BY academie, secteur, sexe"),
}
T0_QUERY = "SELECT grp, COUNT(*) AS n, AVG(x) AS ax FROM t_small GROUP BY grp ORDER BY grp"


# -- data ----------------------------------------------------------------------------------
def generate(rows: int, out: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """``rows`` synthetic pupils (about), one Parquet file per académie in ``out``.

    Columns: eleve_id BIGINT, academie, uai, secteur ('public'/'prive'), sexe ('F'/'M'),
    ips DOUBLE (38–179, one decimal), note_ecrit DOUBLE (0–20, one decimal). Deterministic
    (hash-based draws)."""
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"""CREATE TABLE colleges AS
        WITH v AS (
            SELECT "UAI" AS uai, "Académie" AS academie,
                   CASE "Secteur" WHEN 'PU' THEN 'public' ELSE 'prive' END AS secteur,
                   "Nb candidats - G" AS nb, "Note à l'écrit - G" AS note
            FROM read_csv('{IVAC}', delim=';', header=true)
            WHERE "Session" = 2023 AND "Nb candidats - G" > 0
              AND "Note à l'écrit - G" IS NOT NULL),
        i AS (SELECT "UAI" AS uai, "IPS" AS ips, "Ecart-type de l'IPS" AS sd
              FROM read_csv('{IPS}', delim=';', header=true))
        SELECT v.*, coalesce(i.ips, 104.0) AS ips_c, coalesce(i.sd, 30.0) AS sd_c
        FROM v LEFT JOIN i USING (uai)""")
    total_nb, n_coll, mean_note, sd_note = con.execute(
        "SELECT sum(nb), count(*), avg(note), stddev(note) FROM colleges").fetchall()[0]
    scale = rows / total_nb
    con.execute(f"""CREATE TABLE sized AS SELECT *, greatest(1, round(nb * {scale}))::BIGINT
        AS n, sum(greatest(1, round(nb * {scale}))::BIGINT) OVER (ORDER BY academie, uai
        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS first_id FROM colleges""")
    # two standard normals per pupil (Box–Muller on hash-based uniforms), then the model:
    # IPS ~ N(collège IPS, collège SD), mark ~ N(collège mean + 0.04·(IPS − collège IPS), 3)
    u = "((hash(eleve_id, {s}) % 1000000007)::DOUBLE + 0.5) / 1000000007"
    z = (f"sqrt(-2 * ln({u.format(s=1)})) * cos(2 * pi() * {u.format(s=2)})",
         f"sqrt(-2 * ln({u.format(s=3)})) * cos(2 * pi() * {u.format(s=4)})")
    academies = [r[0] for r in con.execute(
        "SELECT DISTINCT academie FROM sized ORDER BY 1").fetchall()]
    files = {}
    for a in academies:
        path = out / f"{a.lower().replace(' ', '-')}.parquet"
        lit = a.replace("'", "''")
        con.execute(f"""COPY (
            WITH p AS (SELECT coalesce(first_id, 0) + k AS eleve_id, academie, uai, secteur,
                              note, ips_c, sd_c
                       FROM sized, LATERAL range(n) AS r(k) WHERE academie = '{lit}'),
            d AS (SELECT *, round(least(179, greatest(38, ips_c + sd_c * {z[0]})), 1) AS ips
                  FROM p)
            SELECT eleve_id, academie, uai, secteur,
                   CASE WHEN {u.format(s=5)} < 0.49 THEN 'F' ELSE 'M' END AS sexe, ips,
                   round(least(20, greatest(0, note + 0.04 * (ips - ips_c) + 3 * {z[1]})), 1)
                       AS note_ecrit
            FROM d ORDER BY eleve_id) TO '{path}' (FORMAT parquet)""")
        files[a] = path
    made = con.execute(f"SELECT count(*) FROM read_parquet({[str(p) for p in files.values()]!r})"
                       ).fetchall()[0][0]
    con.close()
    calib = {"colleges": n_coll, "real_candidates_2023": int(total_nb), "scale": scale,
             "rows": made, "mean_college_mark": mean_note, "sd_college_mark": sd_note}
    return files, calib


def small_table(out: Path, parts: int) -> list[Path]:
    con = duckdb.connect()
    paths = []
    for i in range(parts):
        p = out / f"small{i}.parquet"
        con.execute(f"""COPY (SELECT range AS id, 'g' || (hash(range) % 10)::VARCHAR AS grp,
            (hash(range * 7 + 1) % 1000000)::DOUBLE / 1000.0 AS x FROM range(1000)
            WHERE range % {parts} = {i}) TO '{p}' (FORMAT parquet)""")
        paths.append(p)
    con.close()
    return paths


# -- federation ------------------------------------------------------------------------------
def _toml_str(p: Any) -> str:  # a node may read several files (a list of sources)
    if isinstance(p, (list, tuple)):
        return json.dumps([str(x) for x in p])
    return json.dumps(str(p))


_harness._toml_str = _toml_str  # the harness writes node configs with it


@dataclass
class ScaleFederation(_harness.Federation):
    n_nodes: int = 2

    @property
    def node_ids(self) -> list[str]:
        return [f"n{i}" for i in range(self.n_nodes)]


def make_board(workdir: Path) -> tuple[Path, Path]:
    from privacy import Grant, generate_board_keys, sign_grant

    generate_board_keys(workdir)
    now = datetime.now(UTC)
    grant = Grant("bench", ("bench",), ("eleves_dp",), 1e6, 1e-6, now + timedelta(days=1),
                  "issue 13 scale benchmark", now)
    path = workdir / "bench.grant"
    path.write_text(sign_grant(grant, (workdir / "board_ed25519.pem").read_bytes()))
    return workdir / "board_ed25519.pub.pem", path


class Cpu:
    """CPU seconds (user + system) of this process and of the node processes."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]

    def nodes(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def rss_mb(self) -> list[float]:
        return [p.memory_info().rss / 2**20 for p in self.procs]

    def hwm_mb(self) -> list[float]:
        out = []
        for p in self.procs:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) / 1024)
        return out


def measure(fns: dict[str, Any], cpu: Cpu, runs: int, warmup: int = 1
            ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any], float]:
    """Interleaved runs; wall and CPU (this process + nodes) per call; peak node RSS."""
    results: dict[str, Any] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            results[name] = fn()
    wall: dict[str, list[float]] = {n: [] for n in fns}
    cpus: dict[str, list[float]] = {n: [] for n in fns}
    peak = 0.0
    for _ in range(runs):
        for name, fn in fns.items():
            n0 = cpu.nodes()
            p0, t0 = time.process_time(), time.perf_counter()
            results[name] = fn()
            t1, p1 = time.perf_counter(), time.process_time()
            n1 = cpu.nodes()
            wall[name].append(t1 - t0)
            cpus[name].append((p1 - p0) + (n1 - n0))
        peak = max(peak, max(cpu.rss_mb()))
    return wall, cpus, results, peak


def check_exact(expected: list[tuple[Any, ...]], got: list[list[Any]]) -> str | None:
    if len(expected) != len(got):
        return f"{len(got)} rows, expected {len(expected)}"
    for i, (e_row, g_row) in enumerate(zip(expected, got, strict=True)):
        for e, g in zip(e_row, g_row, strict=True):
            if isinstance(e, float):
                if g is None or not math.isclose(float(g), e, rel_tol=1e-9):
                    return f"row {i}: {g!r} != {e!r}"
            elif (int(e) if isinstance(e, int) else e) != g:
                return f"row {i}: {g!r} != {e!r}"
    return None


def dp_errors(expected: list[tuple[Any, ...]], got: list[list[Any]], keys: int
              ) -> tuple[str | None, list[float]]:
    """Complete (every group of the truth, no NULL value) and the relative errors."""
    truth = {tuple(r[:keys]): r[keys:] for r in expected}
    have = {tuple(r[:keys]): r[keys:] for r in got}
    missing = [k for k in truth if k not in have]
    if missing:
        return f"{len(missing)} groups missing (e.g. {missing[0]})", []
    errs = []
    for k, vals in truth.items():
        for e, g in zip(vals, have[k], strict=True):
            if g is None or (isinstance(g, float) and not math.isfinite(g)):
                return f"group {k}: value {g!r}", []
            if e:
                errs.append(abs(float(g) - float(e)) / abs(float(e)))
    return None, errs


def noise_over_value(expected: list[tuple[Any, ...]], result: dict[str, Any], keys: int
                     ) -> float | None:
    """Median over the released values of the reported noise sd ÷ the true value."""
    truth = {tuple(r[:keys]): r[keys:] for r in expected}
    ratios = []
    for row, sds in zip(result["rows"], result.get("noise_sd") or [], strict=False):
        for e, sd in zip(truth.get(tuple(row[:keys]), ()), sds[keys:], strict=False):
            if e and sd is not None:
                ratios.append(float(sd) / abs(float(e)))
    return statistics.median(ratios) if ratios else None


def node_imports() -> dict[str, float]:
    """A serving node's imports, alone: wall seconds and RSS before any data."""
    # VmRSS, not ru_maxrss: Linux keeps the parent's peak across fork + exec
    code = ("import time; t = time.perf_counter(); import nodes.cli; "
            "from nodes._engine import NodeEngine; from nodes._service import build_server; "
            "d = time.perf_counter() - t; import pathlib; "
            "rss = [int(x.split()[1]) for x in pathlib.Path('/proc/self/status').read_text()"
            ".splitlines() if x.startswith('VmRSS:')][0]; print(d, rss / 1024)")
    # Bytecode current first, as in an image: with PYTHONDONTWRITEBYTECODE set, a module
    # edited since its .pyc would be compiled again at every import and counted here.
    subprocess.run([PY, "-m", "compileall", "-q", "nodes", "federation", "privacy"],
                   cwd=ROOT, check=True, capture_output=True)
    runs = []
    for _ in range(3):
        out = subprocess.run([PY, "-c", code], cwd=ROOT, env=CHILD_ENV, check=True,
                             capture_output=True, text=True).stdout.split()
        runs.append((float(out[0]), float(out[1])))
    return {"import_s": median([r[0] for r in runs]), "rss_mb": median([r[1] for r in runs])}


# -- one federation ------------------------------------------------------------------------
def run_federation(n: int, files: dict[str, Path], small: list[Path], args: Any,
                   base: duckdb.DuckDBPyConnection, board: tuple[Path, Path],
                   failures: list[str]) -> dict[str, Any]:
    from federation._config import ProjectConfig

    academies = sorted(files)
    per_node = [[files[a] for j, a in enumerate(academies) if j % n == i] for i in range(n)]
    exact = {"perturb": False}
    datasets = [
        Dataset("eleves", per_node, cell_key=exact),
        Dataset("eleves_dp", per_node, tier="sensitive", privacy_unit="row",
                bounds={"note_ecrit": (0.0, 20.0), "ips": (38.0, 179.0)},
                public_domains={"academie": academies, "secteur": ["prive", "public"],
                                "sexe": ["F", "M"]}),
    ]
    t0_nodes = min(3, n)
    if args.t0_runs and n >= 3:
        datasets.append(Dataset("t_small", [*small[:t0_nodes], *[None] * (n - t0_nodes)],
                                cell_key=exact))
    projects = (ProjectConfig("bench", board[1], EPSILON, True),)
    fed = ScaleFederation(datasets, threads=1, memory_limit=args.memory_limit,
                          http=bool(args.t0_runs) and n >= 3, board_public_key=board[0],
                          projects=projects, n_nodes=n)
    out: dict[str, Any] = {"nodes": n}
    started = time.perf_counter()
    try:
        fed.start()
        out["start_s"] = time.perf_counter() - started
        cpu = Cpu([fed.procs[nid].pid for nid in fed.node_ids])
        time.sleep(0.5)
        out["rss_start_mb"] = cpu.rss_mb()
        idle0 = cpu.nodes()
        time.sleep(2.0)
        out["idle_cpu_pct_all_nodes"] = (cpu.nodes() - idle0) / 2.0 * 100
        print(f"{n} nodes up in {out['start_s']:.1f} s; node RSS at start "
              f"{min(out['rss_start_mb']):.0f}–{max(out['rss_start_mb']):.0f} MB; idle CPU of "
              f"all nodes {out['idle_cpu_pct_all_nodes']:.1f}% of a core", flush=True)
        coord, who = fed.coordinator, fed.researcher
        peak = 0.0
        for qname, sql in QUERIES.items():
            keys = 1 if qname.startswith(("Q1", "Q2")) else 3
            wall, cpus, res, pk = measure({
                "duckdb": lambda s=sql: base.execute(s.format(t="eleves")).fetchall(),
                "exact": lambda s=sql: coord.run(s.format(t="eleves"), who)["rows"],
                "dp": lambda s=sql: coord.run(s.format(t="eleves_dp"), who,
                                              epsilon=EPSILON)}, cpu, args.runs)
            peak = max(peak, pk)
            why = check_exact(res["duckdb"], res["exact"])
            if why:
                failures.append(f"{n} nodes {qname} exact: {why}")
            why, errs = dp_errors(res["duckdb"], res["dp"]["rows"], keys)
            if why:
                failures.append(f"{n} nodes {qname} DP: {why}")
            noise = noise_over_value(res["duckdb"], res["dp"], keys)
            d, e, p = (median(wall[k]) for k in ("duckdb", "exact", "dp"))
            cd, ce, cp = (median(cpus[k]) for k in ("duckdb", "exact", "dp"))
            row = {"duckdb_s": d, "exact_s": e, "dp_s": p, "duckdb_cpu_s": cd,
                   "exact_cpu_s": ce, "dp_cpu_s": cp, "wall_ratio": e / d, "cpu_ratio": ce / cd,
                   "dp_wall_ratio": p / d, "dp_cpu_ratio": cp / cd, "dp_over_exact": p / e,
                   "dp_rel_err_median": statistics.median(errs) if errs else None,
                   "dp_rel_err_max": max(errs) if errs else None, "groups": len(res["duckdb"]),
                   # the noise's sd ÷ the true value, median over cells: as released (each
                   # node adds its own noise) and with secure aggregation (one noise: ÷ √n)
                   "dp_rel_sd_median": noise, "dp_rel_sd_secagg_median":
                       noise / math.sqrt(n) if noise is not None else None,
                   "wall": wall, "cpu": cpus}
            out[qname] = row
            print(f"  {qname}: DuckDB {fmt_s(d)} (CPU {fmt_s(cd)}); exact {fmt_s(e)} "
                  f"(CPU {fmt_s(ce)}) → wall {e / d:.2f}×, CPU {ce / cd:.2f}×; DP {fmt_s(p)} "
                  f"(CPU {fmt_s(cp)}) → {p / d:.2f}× wall, {cp / cd:.2f}× CPU, DP÷exact "
                  f"{p / e:.2f}; DP rel. error median {row['dp_rel_err_median'] or 0:.2e}, "
                  f"noise sd ÷ value {row['dp_rel_sd_median'] or 0:.2e} (secure aggregation: "
                  f"{row['dp_rel_sd_secagg_median'] or 0:.2e})", flush=True)
        out["rss_load_peak_mb"] = peak
        out["rss_after_mb"] = cpu.rss_mb()
        out["vmhwm_mb"] = cpu.hwm_mb()
        if fed.http_url:
            import httpx

            http = httpx.Client(base_url=fed.http_url, timeout=60,
                                headers={"Authorization": f"Bearer {TOKEN}"})
            small_con = duckdb.connect()
            small_con.execute(f"CREATE VIEW t_small AS SELECT * FROM read_parquet("
                              f"{[str(p) for p in small[:t0_nodes]]!r})")

            def via_http() -> list[list[Any]]:
                r = http.post("/v1/queries", json={"sql": T0_QUERY})
                r.raise_for_status()
                return r.json()["result"]["rows"]

            served = Cpu([fed.procs["coordinator"].pid])
            c0, s0, m0 = cpu.nodes(), served.nodes(), time.process_time()
            times, res = _harness.time_interleaved({
                "duckdb": lambda: small_con.execute(T0_QUERY).fetchall(),
                "http": via_http}, args.t0_runs, warmup=5)
            per_query = 1000 / (args.t0_runs + 5)  # CPU-ms per query (DuckDB's share is tiny)
            t0_cpu = {"nodes": (cpu.nodes() - c0) * per_query,
                      "coordinator": (served.nodes() - s0) * per_query,
                      "client": (time.process_time() - m0) * per_query}
            why = check_exact(res["duckdb"], res["http"])
            if why:
                failures.append(f"T0 ({n} nodes): {why}")
            out["T0"] = {"http_median_s": median(times["http"]),
                         "http_p95_s": _harness.p95(times["http"]),
                         "duckdb_median_s": median(times["duckdb"]), "cpu_ms": t0_cpu}
            print(f"  T0 (3 nodes hold t_small, HTTP API): median "
                  f"{fmt_s(out['T0']['http_median_s'])}, p95 {fmt_s(out['T0']['http_p95_s'])};"
                  f" CPU-ms per query: all nodes {t0_cpu['nodes']:.1f}, coordinator "
                  f"{t0_cpu['coordinator']:.1f}, client + DuckDB {t0_cpu['client']:.1f}",
                  flush=True)
            http.close()
            small_con.close()
        print(f"  node RSS under load: peak {peak:.0f} MB; VmHWM (incl. loading) "
              f"{min(out['vmhwm_mb']):.0f}–{max(out['vmhwm_mb']):.0f} MB", flush=True)
    finally:
        fed.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_500_000, help="pupils in all (about)")
    ap.add_argument("--nodes", default="2,6,30", help="federation sizes, comma-separated")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per query and variant")
    ap.add_argument("--t0-runs", type=int, default=100, help="T0 runs (0: skip T0)")
    ap.add_argument("--memory-limit", default="1GB", help="each node's DuckDB memory_limit")
    ap.add_argument("--json", type=Path, default=DATA / "last_results_scale.json")
    args = ap.parse_args()
    started = time.perf_counter()
    from bulle_cli import tune_malloc

    tune_malloc()  # this process stands in for the coordinator
    tmp = Path(tempfile.mkdtemp(prefix="bulle-bench-scale-"))
    failures: list[str] = []
    details: dict[str, Any] = {"rows_asked": args.rows, "machine": cpu_info(),
                               "code": tree_info(), "load_avg_start": load_avg()}
    try:
        files, calib = generate(args.rows, tmp / "data")
        small = small_table(tmp, 3)
        details["data"] = calib
        size = sum(p.stat().st_size for p in files.values())
        print(f"{calib['rows']:,} pupils in {len(files)} Parquet files ({size / 2**20:.0f} MB) "
              f"from {calib['colleges']} collèges, made in {time.perf_counter() - started:.1f} s;"
              f" {cpu_info()}; code: {tree_info()}; load average {load_avg()}", flush=True)
        details["node_imports"] = node_imports()
        print(f"node imports (serve path, no data): {details['node_imports']['import_s']:.2f} s,"
              f" {details['node_imports']['rss_mb']:.0f} MB", flush=True)
        base = duckdb.connect()
        base.execute(f"CREATE VIEW eleves AS SELECT * FROM read_parquet("
                     f"{[str(p) for p in files.values()]!r})")
        details["baseline_threads"] = base.execute(
            "SELECT current_setting('threads')").fetchall()[0][0]
        board = make_board(tmp / "board")
        for n in (int(x) for x in args.nodes.split(",") if x):
            details[f"{n} nodes"] = run_federation(n, files, small, args, base, board, failures)
        base.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    lines = ["| nodes | query | fed ÷ DuckDB wall | fed ÷ DuckDB CPU (all processes) | "
             "DP ÷ DuckDB wall / CPU | DP ÷ exact | DP rel. error (median) | "
             "DP noise sd ÷ value: per-node noise / secure aggregation |",
             "|---|---|---|---|---|---|---|---|"]
    for key, fed in details.items():
        if not key.endswith(" nodes"):
            continue
        for qname in QUERIES:
            r = fed[qname]
            lines.append(f"| {fed['nodes']} | {qname} | {r['wall_ratio']:.2f} "
                         f"({fmt_s(r['exact_s'])} vs {fmt_s(r['duckdb_s'])}) | "
                         f"{r['cpu_ratio']:.2f} ({fmt_s(r['exact_cpu_s'])} vs "
                         f"{fmt_s(r['duckdb_cpu_s'])}) | {r['dp_wall_ratio']:.2f} / "
                         f"{r['dp_cpu_ratio']:.2f} | {r['dp_over_exact']:.2f} | "
                         f"{r['dp_rel_err_median'] or 0:.1e} | "
                         f"{r['dp_rel_sd_median'] or 0:.1e} / "
                         f"{r['dp_rel_sd_secagg_median'] or 0:.1e} |")
    lines += ["", "| nodes | start | node RSS at start | node RSS under load (peak) | "
              "node VmHWM (incl. loading) | idle CPU, all nodes | T0 HTTP median / p95 | "
              "T0 CPU-ms per query: nodes / coordinator |",
              "|---|---|---|---|---|---|---|---|"]
    for key, fed in details.items():
        if not key.endswith(" nodes"):
            continue
        t0 = fed.get("T0")
        lines.append(f"| {fed['nodes']} | {fed['start_s']:.1f} s | "
                     f"{min(fed['rss_start_mb']):.0f}–{max(fed['rss_start_mb']):.0f} MB | "
                     f"{fed['rss_load_peak_mb']:.0f} MB | {min(fed['vmhwm_mb']):.0f}–"
                     f"{max(fed['vmhwm_mb']):.0f} MB | {fed['idle_cpu_pct_all_nodes']:.1f}% | "
                     + (f"{fmt_s(t0['http_median_s'])} / {fmt_s(t0['http_p95_s'])} | "
                        f"{t0['cpu_ms']['nodes']:.1f} / {t0['cpu_ms']['coordinator']:.1f} |"
                        if t0 else "— | — |"))
    details["table"] = "\n".join(lines)
    print(details["table"])
    print(f"\nbaseline: one DuckDB (threads = {details.get('baseline_threads')}) over the "
          f"Parquet files; medians of {args.runs} interleaved runs; ε = {EPSILON}; total "
          f"{time.perf_counter() - started:.0f} s; load average {load_avg()}")
    return _harness.finish(details, failures, args.json,
                           "exact answers equal DuckDB's; DP answers complete")


if __name__ == "__main__":
    sys.exit(main())
