"""Federated SQL benchmarks (issue 3): R1, T0 and R4, ratios measured in the same run.

    .venv/bin/python benchmarks/bench_federated_sql.py [--rows N]

R1  federated query time over 3 nodes ÷ one DuckDB query over the union (target ≤ 1.5)
T0  end-to-end latency through the HTTP API on a 1,000-row table (target ≤ 10 ms median)
R4  rows/s through one node's gRPC ExecuteRows stream ÷ rows/s of the same SQL in DuckDB
    (target ≥ 0.9); the unary Execute is timed too, for scale

Nodes are real ``bulle node serve`` subprocesses (mutual TLS, ``threads = 1`` each, 2 cores),
the HTTP API a real ``bulle coordinator serve`` subprocess; see ``_harness.py`` for why.
Timing misses are reported, never asserted; a wrong answer makes the script exit 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    DATA,
    TOKEN,
    Dataset,
    Row,
    cpu_info,
    federation,
    finish,
    fmt_s,
    gen_partitions,
    load_avg,
    median,
    p95,
    print_table,
    time_interleaved,
    tree_info,
)

R1_QUERIES = {
    "COUNT(*)": "SELECT COUNT(*) AS n FROM t",
    "SUM/AVG": "SELECT SUM(x) AS sx, AVG(x) AS ax, SUM(k) AS sk FROM t",
    "GROUP BY AVG/STDDEV": ("SELECT grp, COUNT(*) AS n, AVG(x) AS ax, STDDEV(x) AS sdx "
                            "FROM t GROUP BY grp ORDER BY grp"),
}
T0_QUERY = "SELECT grp, COUNT(*) AS n, AVG(x) AS ax FROM t_small GROUP BY grp ORDER BY grp"


def same(expected: list[tuple[Any, ...]], got: list[list[Any]]) -> str | None:
    """None if equal (exact ints/strings, 1e-9 relative for floats), else a reason."""
    if len(expected) != len(got):
        return f"{len(got)} rows, expected {len(expected)}"
    for i, (e_row, g_row) in enumerate(zip(expected, got, strict=True)):
        if len(e_row) != len(g_row):
            return f"row {i}: {len(g_row)} columns, expected {len(e_row)}"
        for e, g in zip(e_row, g_row, strict=True):
            if isinstance(e, float) or isinstance(g, float):
                if g is None or not math.isclose(float(e), float(g), rel_tol=1e-9, abs_tol=0):
                    return f"row {i}: {g!r} != {e!r}"
            elif (int(e) if hasattr(e, "__int__") and not isinstance(e, str) else e) != g:
                return f"row {i}: {g!r} != {e!r}"
    return None


def node_ms(fed: Any, since: dict[str, int]) -> dict[str, float]:
    """Median engine time per node (the node's own audit 'ms') since the given offsets."""
    out = {}
    for nid in fed.node_ids:
        ms = fed.released_ms(nid)[since.get(nid, 0):]
        if ms:
            out[nid] = round(median(ms), 2)
    return out


def audit_offsets(fed: Any) -> dict[str, int]:
    return {nid: len(fed.released_ms(nid)) for nid in fed.node_ids}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows in total for R1/R4")
    ap.add_argument("--runs", type=int, default=9, help="warm runs per R1/R4 measurement")
    ap.add_argument("--t0-runs", type=int, default=200)
    ap.add_argument("--json", type=Path, default=DATA / "last_results.json")
    args = ap.parse_args()
    started = time.perf_counter()
    # This process stands in for the coordinator: tune malloc as `coordinator serve` does.
    from bulle_cli import tune_malloc

    tune_malloc()

    parts = gen_partitions("t", args.rows)
    small = gen_partitions("small", 1000)
    print(f"data ready in {time.perf_counter() - started:.1f} s; {cpu_info()}; "
          f"code: {tree_info()}; load average {load_avg()}", flush=True)
    # restricted with the cell key method switched off (min_count 0, perturb = false): exact
    # answers, checked against the single-DuckDB baseline
    exact = {"perturb": False}
    datasets = [Dataset("t", parts, cell_key=exact), Dataset("t_small", small, cell_key=exact),
                Dataset("t_open", [parts[0]], tier="open")]

    rows: list[Row] = []
    details: dict[str, Any] = {"rows": args.rows, "machine": cpu_info(), "code": tree_info(),
                               "load_avg_start": load_avg()}
    failures: list[str] = []
    t = time.perf_counter()
    with federation(datasets, threads=1) as fed:
        print(f"3 nodes + HTTP coordinator up in {time.perf_counter() - t:.1f} s", flush=True)
        coord, who = fed.coordinator, fed.researcher
        http = httpx.Client(base_url=fed.http_url, timeout=120,
                            headers={"Authorization": f"Bearer {TOKEN}"})

        def via_http(sql: str) -> list[list[Any]]:
            r = http.post("/v1/queries", json={"sql": sql})
            r.raise_for_status()
            return r.json()["result"]["rows"]

        # ---- R1 ------------------------------------------------------------------
        base = duckdb.connect()  # threads: DuckDB's default (all cores)
        base.execute("CREATE TABLE t AS SELECT * FROM read_parquet("
                     f"{[str(p) for p in parts]!r})")
        base_threads = base.execute("SELECT current_setting('threads')").fetchone()[0]
        details["baseline_threads"] = base_threads
        for name, sql in R1_QUERIES.items():
            off = audit_offsets(fed)
            times, res = time_interleaved({
                "duckdb": lambda sql=sql: base.execute(sql).fetchall(),
                "coordinator": lambda sql=sql: coord.run(sql, who)["rows"],
                "http": lambda sql=sql: via_http(sql)}, args.runs)
            per_node = node_ms(fed, off)
            b_times, c_times, h_times = times["duckdb"], times["coordinator"], times["http"]
            expected, got, got_http = res["duckdb"], res["coordinator"], res["http"]
            for label, g in (("Coordinator.run", got), ("HTTP", got_http)):
                why = same(expected, g)
                if why:
                    failures.append(f"R1 {name} via {label}: {why}")
            b, c, h = median(b_times), median(c_times), median(h_times)
            rows.append(Row(f"R1 {name} (Coordinator.run)", fmt_s(b), fmt_s(c),
                            f"{c / b:.2f}", "≤ 1.5", c / b <= 1.5))
            rows.append(Row(f"R1 {name} (HTTP API)", fmt_s(b), fmt_s(h), f"{h / b:.2f}",
                            "≤ 1.5", h / b <= 1.5))
            details[f"R1 {name}"] = {"baseline_s": b_times, "coordinator_s": c_times,
                                     "http_s": h_times, "node_engine_ms_median": per_node}
            print(f"R1 {name}: median (min) duckdb {fmt_s(b)} ({fmt_s(min(b_times))}), "
                  f"coordinator {fmt_s(c)} ({fmt_s(min(c_times))}), http {fmt_s(h)} "
                  f"({fmt_s(min(h_times))}); node engine ms, median per node (from the node audit "
                  f"log, every Execute of this measurement): {per_node}", flush=True)
        base.close()

        # ---- T0 ------------------------------------------------------------------
        from enclave import connect

        hub = connect(fed.http_url, TOKEN)
        small_con = duckdb.connect()
        small_con.execute("CREATE TABLE t_small AS SELECT * FROM read_parquet("
                          f"{[str(p) for p in small]!r})")
        n = args.t0_runs
        off = audit_offsets(fed)
        times, res = time_interleaved({
            "duckdb": lambda: small_con.execute(T0_QUERY).fetchall(),
            "coordinator": lambda: coord.run(T0_QUERY, who)["rows"],
            "http": lambda: via_http(T0_QUERY),
            "sdk": lambda: hub.sql(T0_QUERY, progress=False)}, n, warmup=10)
        per_node = node_ms(fed, off)
        d_times, c_times, h_times, s_times = (times[k] for k in ("duckdb", "coordinator",
                                                                  "http", "sdk"))
        expected, got, got_http, df = (res[k] for k in ("duckdb", "coordinator", "http",
                                                         "sdk"))
        got_sdk = [list(r) for r in df.itertuples(index=False)]
        for label, g in (("Coordinator.run", got), ("HTTP", got_http), ("SDK", got_sdk)):
            why = same(expected, g)
            if why:
                failures.append(f"T0 via {label}: {why}")
        for label, ts in (("HTTP API, httpx", h_times), ("HTTP API, SDK → DataFrame", s_times)):
            rows.append(Row(f"T0 {label} (median)", fmt_s(median(d_times)), fmt_s(median(ts)),
                            "—", "≤ 10 ms", median(ts) <= 0.010))
            rows.append(Row(f"T0 {label} (p95)", fmt_s(p95(d_times)), fmt_s(p95(ts)), "—",
                            "—", None))
        rows.append(Row("T0 Coordinator.run in-process (median)", fmt_s(median(d_times)),
                        fmt_s(median(c_times)), "—", "(info)", None))
        rows.append(Row("T0 Coordinator.run in-process (p95)", fmt_s(p95(d_times)),
                        fmt_s(p95(c_times)), "—", "(info)", None))
        details["T0"] = {"duckdb_s": d_times, "coordinator_s": c_times, "http_s": h_times,
                         "sdk_s": s_times, "node_engine_ms_median": per_node}
        print(f"T0: duckdb {fmt_s(median(d_times))}, coordinator {fmt_s(median(c_times))}, "
              f"http {fmt_s(median(h_times))} (p95 {fmt_s(p95(h_times))}), "
              f"sdk {fmt_s(median(s_times))} (p95 {fmt_s(p95(s_times))}), "
              f"node engine ms {per_node}", flush=True)
        hub.close()
        small_con.close()

        # ---- R4 ------------------------------------------------------------------
        from federation._planner import plan_query
        from federation._sql import parse

        per_node_rows = args.rows // 3
        cut = max(1, min(100, int(0.95e6 * 100 / max(per_node_rows, 1))))
        r4_sql = f"SELECT id, x, k FROM t_open WHERE k < {cut}"
        catalog = coord.catalog(refresh=True)
        fp = plan_query(parse(r4_sql, {n_: t_.columns for n_, t_ in catalog.items()}))
        plan = fp.plan
        plan.request_id, plan.project, plan.researcher = "bench-r4", "bench", "bench"
        channel, stub = fed.node_stub("n0")

        def bulle_rows() -> pa.Table:  # as the coordinator reads rows: ExecuteRows stream
            pieces = [c.arrow_ipc for c in stub.ExecuteRows(plan, timeout=120)]
            with pa.ipc.open_stream(b"".join(pieces)) as reader:
                return reader.read_all()

        def bulle_unary() -> pa.Table:  # the same plan through the unary Execute, for scale
            res = stub.Execute(plan, timeout=120)
            with pa.ipc.open_stream(res.arrow_ipc) as reader:
                return reader.read_all()

        open_con = duckdb.connect()
        open_con.execute(f"CREATE TABLE t_open AS SELECT * FROM read_parquet('{parts[0]}')")
        one_con = duckdb.connect(config={"threads": 1})
        one_con.execute(f"CREATE TABLE t_open AS SELECT * FROM read_parquet('{parts[0]}')")
        off = audit_offsets(fed)
        times, res = time_interleaved({
            "duckdb": lambda: open_con.sql(r4_sql).to_arrow_table(),
            "duckdb1": lambda: one_con.sql(r4_sql).to_arrow_table(),
            "bulle": bulle_rows, "unary": bulle_unary}, args.runs)
        per_node = node_ms(fed, off)
        b_times, b1_times, g_times = times["duckdb"], times["duckdb1"], times["bulle"]
        b_tab, g_tab = res["duckdb"], res["bulle"]
        channel.close()
        open_con.close()
        one_con.close()
        if b_tab.num_rows != g_tab.num_rows or \
                pc.sum(b_tab["id"]).as_py() != pc.sum(g_tab["c0"]).as_py():
            failures.append(f"R4: {g_tab.num_rows} rows, expected {b_tab.num_rows}")
        nrows = b_tab.num_rows
        b, b1, g = median(b_times), median(b1_times), median(g_times)
        u = median(times["unary"])
        rows.append(Row(f"R4 {nrows:,} rows, node gRPC vs DuckDB (default threads)",
                        f"{nrows / b / 1e6:.1f} Mrow/s ({fmt_s(b)})",
                        f"{nrows / g / 1e6:.1f} Mrow/s ({fmt_s(g)})", f"{b / g:.2f}", "≥ 0.9",
                        b / g >= 0.9))
        rows.append(Row(f"R4 {nrows:,} rows, node gRPC vs DuckDB threads=1",
                        f"{nrows / b1 / 1e6:.1f} Mrow/s ({fmt_s(b1)})",
                        f"{nrows / g / 1e6:.1f} Mrow/s ({fmt_s(g)})", f"{b1 / g:.2f}", "(info)",
                        None))
        rows.append(Row(f"R4 {nrows:,} rows, unary Execute vs DuckDB (default threads)",
                        f"{nrows / b / 1e6:.1f} Mrow/s ({fmt_s(b)})",
                        f"{nrows / u / 1e6:.1f} Mrow/s ({fmt_s(u)})", f"{b / u:.2f}", "(info)",
                        None))
        details["R4"] = {"sql": r4_sql, "rows": nrows, "duckdb_s": b_times,
                         "duckdb_threads1_s": b1_times, "bulle_s": g_times,
                         "unary_s": times["unary"],
                         "ipc_bytes": g_tab.nbytes, "node_engine_ms_median": per_node}
        print(f"R4 ({r4_sql}): median (min) duckdb {fmt_s(b)} ({fmt_s(min(b_times))}), "
              f"threads=1 {fmt_s(b1)} ({fmt_s(min(b1_times))}), node gRPC stream {fmt_s(g)} "
              f"({fmt_s(min(g_times))}), unary {fmt_s(u)}; node engine ms {per_node}",
              flush=True)
        http.close()

    print()
    details["table"] = print_table(rows)
    print(f"\nbaseline DuckDB threads = {details['baseline_threads']}; medians of "
          f"{args.runs} warm runs (R1, R4) and {args.t0_runs} runs (T0); "
          f"total {time.perf_counter() - started:.0f} s; load average {load_avg()}")
    return finish(details, failures, args.json, "all answers match the single-DuckDB baseline")

if __name__ == "__main__":
    sys.exit(main())
