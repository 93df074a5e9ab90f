"""Privacy ledger benchmark: latency of one check+charge with a long history.

    .venv/bin/python benchmarks/bench_ledger.py [--prior 10000] [--n 2000] [--db PATH]

Fills a project with ``--prior`` charges through ``Ledger.charge`` (the real path: one
``BEGIN IMMEDIATE`` transaction and one WAL fsync each, ``synchronous=FULL``), then times
``--n`` more charges, each a new request_id, drawn from a mix of Laplace events at a few ε
values plus an occasional DP-SGD event (their RDP vectors are cached after first use, as in
a running node). Target: p99 ≤ 2 ms. Figures are printed, never asserted.

For scale, it also times the floor set by the disk: a bare sqlite3 ``BEGIN IMMEDIATE`` +
one-row insert + ``COMMIT`` with the same WAL/``synchronous=FULL`` settings, next to the
ledger file. On a shared 2-core VM the p99 of both is dominated by fsync and scheduling.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from privacy import Ledger, aggregate_event, laplace_event, opacus_event

EVENTS = [
    laplace_event(0.01),
    laplace_event(0.05),
    aggregate_event("mean", 0.1),
    aggregate_event("quantile", 0.05),
    opacus_event([(1.1, 0.01, 100)]),
]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def fsync_floor(path: str, n: int) -> list[float]:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = FULL")
    con.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER)")
    out = []
    for i in range(n):
        t = time.perf_counter()
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t VALUES (?)", (i,))
        con.execute("COMMIT")
        out.append((time.perf_counter() - t) * 1e3)
    con.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=2_000)
    ap.add_argument("--db", default="")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if not args.db else None
    db = args.db or os.path.join(tmp.name, "ledger.db")  # type: ignore[union-attr]

    led = Ledger(db)
    led.set_budget("bench", "ds", 1e9, 1e-6)  # large cap: every charge is written
    led.set_budget("bench", "*", 1e9, 1e-6)  # the project-wide row is locked and written too
    t0 = time.perf_counter()
    for i in range(args.prior):
        led.charge(f"prior-{i}", "bench", "ds", EVENTS[i % len(EVENTS)])
    fill = time.perf_counter() - t0

    lat = []
    for i in range(args.n):
        e = EVENTS[i % len(EVENTS)]
        t = time.perf_counter()
        r = led.charge(f"req-{i}", "bench", "ds", e)
        lat.append((time.perf_counter() - t) * 1e3)
        assert r.accepted and not r.replay
    replay = []
    for i in range(min(args.n, 500)):
        t = time.perf_counter()
        led.charge(f"req-{i}", "bench", "ds", EVENTS[i % len(EVENTS)])
        replay.append((time.perf_counter() - t) * 1e3)

    floor = fsync_floor(db + ".floor", args.n)
    n_hist = len(led.history("bench", "ds"))
    print(f"ledger: {db}  (SQLite WAL, synchronous=FULL), {n_hist} charges in the project")
    each = fill / max(args.prior, 1) * 1e3
    print(f"fill: {args.prior} charges in {fill:.1f} s ({each:.2f} ms each)")
    print(f"check+charge over {args.n}: p50 {pct(lat, 50):.3f} ms  p99 {pct(lat, 99):.3f} ms  "
          f"mean {statistics.fmean(lat):.3f} ms  max {max(lat):.3f} ms  (target p99 <= 2 ms: "
          f"{'met' if pct(lat, 99) <= 2 else 'MISSED'})")  # fmt: skip
    print(f"replay (idempotent) over {len(replay)}: p50 {pct(replay, 50):.3f} ms  "
          f"p99 {pct(replay, 99):.3f} ms")  # fmt: skip
    print(f"disk floor (bare sqlite3 commit) over {len(floor)}: p50 {pct(floor, 50):.3f} ms  "
          f"p99 {pct(floor, 99):.3f} ms")  # fmt: skip
    led.close()
    for suffix in (".floor", ".floor-wal", ".floor-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
