"""DP overhead benchmark (issue 4, R3): a sensitive-tier query ÷ the same query, restricted.

    .venv/bin/python benchmarks/bench_dp.py [--rows N] [--runs N]

R3  DP query time ÷ the same query on the same data in the ``restricted`` tier (min_count=0,
    ``cell_key = { perturb = false }``: exact answers, no perturbation; the nodes run with
    BULLE_ALLOW_EXACT_RELEASE=1, see ``_harness.exact_release_env``), 3 nodes, measured
    interleaved (restricted, DP, restricted, DP, …) through ``Coordinator.run``. Target ≤ 1.10,
    or ≤ 2.0 when contribution bounding needs a per-unit pass, which it does here: the node
    ranks each unit's rows with ``ROW_NUMBER() OVER (PARTITION BY unit ORDER BY hash(rowid,
    salt))`` and keeps at most ``max_rows_per_unit`` (``nodes/_compile.py::_compile_dp``).

Also timed: the coordinator's grant check and ledger charge inside those DP queries (wrapped
in place, in-process), and the node SQL alone in a local DuckDB (threads=1, one partition):
the plain aggregate vs the same aggregate over the per-unit window, i.e. what the window
costs. Timing misses are reported, never asserted; a wrong answer makes the script exit 1.
"""

from __future__ import annotations

import argparse
import math
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    DATA,
    Dataset,
    Row,
    cpu_info,
    federation,
    finish,
    fmt_s,
    gen_partitions,
    load_avg,
    median,
    print_table,
    time_interleaved,
    tree_info,
)

QUERIES = {
    "COUNT(*)": "SELECT COUNT(*) AS n FROM {t}",
    "SUM/AVG(x)": "SELECT SUM(x) AS sx, AVG(x) AS ax FROM {t}",
    "GROUP BY grp COUNT/AVG": ("SELECT grp, COUNT(*) AS n, AVG(x) AS ax FROM {t} "
                               "GROUP BY grp ORDER BY grp"),
}
UNIT_ROWS = 5  # rows per privacy unit in the synthetic data (= max_rows_per_unit)
GROUPS = [f"g{i}" for i in range(10)]
EPSILON = 1.0


def make_board(workdir: Path) -> tuple[Path, Path]:
    """Board keys and a signed grant for project "bench" (researcher "bench")."""
    from privacy import Grant, generate_board_keys, sign_grant

    generate_board_keys(workdir)
    now = datetime.now(UTC)
    grant = Grant("bench", ("bench",), ("t_dp",), 1e6, 1e-6, now + timedelta(days=1),
                  "R3 benchmark", now)
    path = workdir / "bench.grant"
    path.write_text(sign_grant(grant, (workdir / "board_ed25519.pem").read_bytes()))
    return workdir / "board_ed25519.pub.pem", path


def timed(store: list[float], fn: Any) -> Any:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            store.append(time.perf_counter() - t)
    return wrapper


def node_sql_alone(part: Path, runs: int) -> list[tuple[str, float, float]]:
    """Plain aggregate vs the node's DP shape (per-unit window, then aggregate) on one
    partition in a local DuckDB with threads=1 (as a node is configured here)."""
    con = duckdb.connect(config={"threads": 1})
    con.execute(f"CREATE TABLE t AS SELECT * FROM read_parquet('{part}')")
    salt = secrets.randbits(62)
    win = (f"ROW_NUMBER() OVER (PARTITION BY t.unit ORDER BY hash(t.rowid, {salt})) AS __rn")
    clampx = "greatest(0.0, least(1000.0, x))"
    pairs = {
        "COUNT(*)": ("SELECT COUNT(*) FROM t",
                     f"SELECT COUNT(*) FROM (SELECT {win} FROM t) WHERE __rn <= {UNIT_ROWS}"),
        "SUM/AVG(x)": ("SELECT SUM(x), COUNT(x) FROM t",
                       f"SELECT SUM(__a0), COUNT(__a1) FROM (SELECT {clampx} AS __a0, x AS __a1,"
                       f" {win} FROM t) WHERE __rn <= {UNIT_ROWS}"),
        "GROUP BY grp COUNT/AVG": (
            "SELECT grp, COUNT(*), SUM(x), COUNT(x) FROM t GROUP BY 1",
            f"SELECT g, COUNT(*), SUM(__a1), COUNT(__a2) FROM (SELECT grp AS g, "
            f"{clampx} AS __a1, x AS __a2, {win} FROM t) WHERE __rn <= {UNIT_ROWS} GROUP BY 1"),
    }
    out = []
    for name, (plain, dp) in pairs.items():
        times, _ = time_interleaved({"plain": lambda s=plain: con.execute(s).fetchall(),
                                     "dp": lambda s=dp: con.execute(s).fetchall()}, runs,
                                    warmup=1)
        out.append((name, median(times["plain"]), median(times["dp"])))
    con.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows in total (3 nodes)")
    ap.add_argument("--runs", type=int, default=7, help="warm runs per variant (≥ 5)")
    ap.add_argument("--json", type=Path, default=DATA / "last_results_dp.json")
    args = ap.parse_args()
    started = time.perf_counter()
    load_start = load_avg()

    parts = gen_partitions("dp", args.rows, unit_rows=UNIT_ROWS)
    print(f"data ready in {time.perf_counter() - started:.1f} s; {cpu_info()}; "
          f"code: {tree_info()}; load average {load_start}", flush=True)

    from federation._config import ProjectConfig

    board_dir = Path(tempfile.mkdtemp(prefix="bulle-bench-board-"))
    board_pub, grant_file = make_board(board_dir)
    datasets = [
        Dataset("t_r", parts, tier="restricted", min_count=0, round_to=1,
                cell_key={"perturb": False}),
        Dataset("t_dp", parts, tier="sensitive", privacy_unit="unit",
                max_rows_per_unit=UNIT_ROWS, bounds={"x": (0.0, 1000.0)},
                public_domains={"grp": GROUPS}),
    ]
    # every unit lives at one node (see gen_partitions): the board may declare them disjoint
    projects = (ProjectConfig("bench", grant_file, EPSILON, True),)
    truth = duckdb.connect()
    truth.execute(f"CREATE TABLE t AS SELECT * FROM read_parquet({[str(p) for p in parts]!r})")

    rows: list[Row] = []
    details: dict[str, Any] = {"rows": args.rows, "machine": cpu_info(), "code": tree_info(),
                               "load_avg_start": load_start, "epsilon": EPSILON}
    failures: list[str] = []
    ledger: dict[str, list[float]] = {"check": [], "charge": []}
    t = time.perf_counter()
    try:
        with federation(datasets, threads=1, http=False, board_public_key=board_pub,
                        projects=projects) as fed:
            print(f"3 nodes up in {time.perf_counter() - t:.1f} s", flush=True)
            coord, who = fed.coordinator, fed.researcher
            coord.projects.check = timed(ledger["check"], coord.projects.check)
            coord.projects.charge = timed(ledger["charge"], coord.projects.charge)
            for name, sql in QUERIES.items():
                r_sql, d_sql = sql.format(t="t_r"), sql.format(t="t_dp")
                n_check = len(ledger["check"])
                times, res = time_interleaved({
                    "restricted": lambda s=r_sql: coord.run(s, who),
                    "dp": lambda s=d_sql: coord.run(s, who, epsilon=EPSILON)}, args.runs)
                r, d = median(times["restricted"]), median(times["dp"])
                # sanity: restricted is exact; DP close to the truth (5 rows/unit, nothing
                # dropped by bounding; Laplace noise at ε=1 is tiny next to 10M rows)
                expected = truth.execute(sql.format(t="t")).fetchall()
                got_r, got_d = res["restricted"]["rows"], res["dp"]["rows"]
                for e_row, r_row, d_row in zip(expected, got_r, got_d, strict=True):
                    for e, rv, dv in zip(e_row, r_row, d_row, strict=True):
                        if isinstance(e, str):
                            ok_r, ok_d = rv == e, dv == e
                        else:
                            ok_r = math.isclose(float(rv), float(e), rel_tol=1e-9)
                            ok_d = math.isclose(float(dv), float(e), rel_tol=0.01)
                        if not ok_r:
                            failures.append(f"{name} restricted: {rv!r} != {e!r}")
                        if not ok_d:
                            failures.append(f"{name} DP: {dv!r} far from {e!r}")
                if len(expected) != len(got_r) or len(expected) != len(got_d):
                    failures.append(f"{name}: row counts {len(got_r)}/{len(got_d)}, "
                                    f"expected {len(expected)}")
                lc = [a + b for a, b in zip(ledger["check"][n_check:],
                                            ledger["charge"][n_check:], strict=True)]
                ratio = d / r
                rows.append(Row(f"R3 {name}", fmt_s(r), fmt_s(d), f"{ratio:.2f}",
                                "≤ 2.0 (per-unit pass)", ratio <= 2.0))
                details[f"R3 {name}"] = {"restricted_s": times["restricted"],
                                         "dp_s": times["dp"], "coord_check_charge_s": lc,
                                         "epsilon_spent": res["dp"].get("epsilon_spent")}
                print(f"R3 {name}: median (min) restricted {fmt_s(r)} "
                      f"({fmt_s(min(times['restricted']))}), DP {fmt_s(d)} "
                      f"({fmt_s(min(times['dp']))}); coordinator check+charge median "
                      f"{fmt_s(median(lc))}", flush=True)
    finally:
        truth.close()
        import shutil
        shutil.rmtree(board_dir, ignore_errors=True)

    print("\nnode SQL alone, one partition, DuckDB threads=1 (plain vs per-unit window):")
    sql_alone = node_sql_alone(parts[0], args.runs)
    for name, plain, dp in sql_alone:
        print(f"  {name}: plain {fmt_s(plain)}, with window {fmt_s(dp)} "
              f"(+{fmt_s(dp - plain)}, ×{dp / plain:.1f})")
    details["node_sql_alone"] = sql_alone

    print()
    details["table"] = print_table(rows)
    allc = ledger["check"]
    allch = ledger["charge"]
    print(f"\ncoordinator grant check median {fmt_s(median(allc))}, ledger charge median "
          f"{fmt_s(median(allch))} (n={len(allch)}, in-process, inside the DP queries)")
    details["load_avg_end"] = load_avg()
    print(f"medians of {args.runs} warm runs, interleaved; total "
          f"{time.perf_counter() - started:.0f} s; load average start {load_start}, end "
          f"{details['load_avg_end']}")
    return finish(details, failures, args.json,
                  "restricted answers exact; DP answers within 1 % of the truth")


if __name__ == "__main__":
    sys.exit(main())
