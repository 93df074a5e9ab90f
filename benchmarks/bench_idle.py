"""Idle demo federation (issue 13): CPU of every demo process while nobody works.

    .venv/bin/python benchmarks/bench_idle.py [--settle 45] [--window 60]

Starts ``bulle demo up`` in a temporary state folder (six nodes with real data, two of them
with training: SuperNode + executor, the SuperLink and its SuperExec, the coordinator, the
hub, its proxy and the spawn broker), waits ``--settle`` seconds (the Flower pollers keep
short waits for half a minute after start, as after a run's last round), then reads the CPU
time (user + system, psutil) of every process the demo started and of their children over
``--window`` seconds, and stops the demo. Target: < 3% of one core for all together.
Needs root (the demo runs its services as system users), as ``bulle demo up`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BULLE = [sys.executable, "-m", "bulle_cli"]


def _trees(pids: dict[str, int]) -> dict[str, list[psutil.Process]]:
    out = {}
    for name, pid in pids.items():
        try:
            top = psutil.Process(pid)
            out[name] = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            out[name] = []
    return out


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(p.cpu_times()[:2])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settle", type=float, default=45.0, help="seconds after `up`")
    ap.add_argument("--window", type=float, default=60.0, help="seconds measured")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bulle-idle-"))
    try:
        subprocess.run([*BULLE, "demo", "--state", str(state), "up"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
        time.sleep(args.settle)
        trees = _trees(json.loads((state / "pids.json").read_text()))
        before = {name: _cpu(t) for name, t in trees.items()}
        t0 = time.monotonic()
        time.sleep(args.window)
        elapsed = time.monotonic() - t0
        share = {name: (_cpu(t) - before[name]) / elapsed * 100 for name, t in trees.items()}
    finally:
        subprocess.run([*BULLE, "demo", "--state", str(state), "down"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, timeout=300)
        shutil.rmtree(state, ignore_errors=True)
    print(f"idle demo federation, {args.window:.0f} s after {args.settle:.0f} s of settling "
          f"(% of one core, each process with its children):")
    for name, pct in sorted(share.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<14} {pct:6.2f}%  ({len(trees[name])} processes)")
    total = sum(share.values())
    print(f"  {'all':<14} {total:6.2f}%  (target < 3%: {'met' if total < 3 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
