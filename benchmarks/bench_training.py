"""DP training benchmarks (issue 6): R7, the Flower round overhead, R8.

- R7: one Opacus DP-SGD epoch ÷ one plain PyTorch epoch, same model, data, batch size and
  optimizer (hooks; and ghost clipping where Opacus supports the model), one thread.
- Round overhead: a Flower round with 3 nodes on loopback (SuperLink with TLS, SuperNodes
  with registered keys, our executors) minus the slowest node's local work (``train_s``:
  view, evaluation and DP-SGD). Median over rounds 2… (round 1 also calibrates σ), with
  the parts: message to the task (``queue_s``), task input pull, the rest of the task
  (grant, ledger, audit), and the reply back to the ServerApp.
- R8: one federated round (3 nodes, 1 local epoch each) ÷ one centralized DP-SGD epoch of
  the same model on the union of the nodes' data, in one process.
- Run authorisation (issue 12): what a node adds per round to check the coordinator's
  signed authorisation before it touches data (``nodes._training.authorise``: Ed25519
  verification, canonical hash of the spec, spec parse), timed in this process on the
  spec of the rounds below; and, in the rounds, each node's own measure of it (``auth_s``).

Usage (each section stops every process it starts)::

    .venv/bin/python benchmarks/bench_training.py                  # all, poll 0.05 s
    .venv/bin/python benchmarks/bench_training.py --poll 0.2 --skip-r7
    .venv/bin/python benchmarks/bench_training.py --auth-only      # the check alone
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NODES = {"b1": ("AAA", "CCC"), "b2": ("EEE", "GGG"), "b3": ("DDD",)}
FEATURES = ["score", "assessment_type", "weight", "date", "date_submitted", "is_banked"]
REQUEST = {"table": "student_assessment", "features": FEATURES, "label": "score >= 70",
           "join": ["assessments"], "bounds": {"weight": [0, 100], "date": [0, 300]},
           "order_by": "date_submitted", "max_len": 8, "batch_size": 128, "epochs": 1}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _views(model: str, modules: tuple[str, ...], tmp: Path) -> Any:
    """The training view a node builds, for ``modules`` of OULAD, in this process."""
    from federation._certs import make_certs
    from nodes._config import load_node_config
    from nodes._engine import NodeEngine
    from nodes._training import TrainSpec, build_view, check_spec, fetch_rows
    from tests._federation import node_toml
    from tests._training import vendor_datasets

    certs = make_certs(tmp / "certs", ["bench"])
    path = tmp / f"bench-{model}-{'-'.join(modules)}.toml"
    path.write_text(node_toml("bench", certs, vendor_datasets(modules),
                              f'state_dir = "{tmp}/bench-state"'))
    engine = NodeEngine(load_node_config(path))
    layout = [{"name": "score", "kind": "num", "lo": 0, "hi": 100},
              {"name": "assessment_type", "kind": "cat", "values": ["CMA", "Exam", "TMA"]},
              {"name": "weight", "kind": "num", "lo": 0, "hi": 100},
              {"name": "date", "kind": "num", "lo": 0, "hi": 300},
              {"name": "date_submitted", "kind": "num", "lo": -30, "hi": 300},
              {"name": "is_banked", "kind": "num", "lo": 0, "hi": 1}]
    spec = TrainSpec.parse({
        "job": "bench", "project": "p", "researcher": "r", "grant": "g", "model": model,
        "hidden": 16 if model == "gru" else 32, "table": "student_assessment",
        "joins": [["assessments", "id_assessment"]], "features": layout,
        "label": ["score", ">=", 70], "order_by": "date_submitted", "max_len": 8,
        "rounds": 1, "epochs": 1, "batch_size": 128, "lr": 0.3, "max_grad_norm": 1.0,
        "epsilon": 1.0, "delta": 1e-6, "noise_multiplier": 1.0, "eval_fraction": 0.0,
        "eval_share": 0.2, "bins": 4})
    where = check_spec(spec, engine.meta, ("logreg", "mlp", "gru"))
    import numpy as np

    view = build_view(fetch_rows(engine.cursor(), spec, "id_student", where), spec, b"bench",
                      np.random.default_rng(0))
    engine.close()
    return spec, view


def _epoch(spec: Any, view: Any, mode: str) -> float:
    """Seconds of one epoch: plain PyTorch, Opacus hooks, or Opacus ghost clipping."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from bulle_flower.models import build_model

    torch.manual_seed(0)
    model = build_model(spec.model, spec.input_width, spec.hidden, dp=True)
    data = TensorDataset(torch.from_numpy(view.x_train), torch.from_numpy(view.y_train))
    loader = DataLoader(data, batch_size=spec.batch_size, shuffle=(mode == "plain"))
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if mode != "plain":
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model.train()
        if mode == "ghost":
            model, optimizer, loss_fn, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=loss_fn,
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost")
        else:
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0)
    model.train()
    started = time.perf_counter()
    for xb, yb in loader:
        if len(xb) == 0:
            continue
        optimizer.zero_grad()
        loss_fn(model(xb), yb).backward()
        optimizer.step()
    return time.perf_counter() - started


def r7(tmp: Path, repeats: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)  # as at a node (2 shared cores)
    out = []
    modules = tuple(m for ms in NODES.values() for m in ms)
    for model in ("logreg", "mlp", "gru"):
        spec, view = _views(model, modules, tmp)
        times: dict[str, list[float]] = {"plain": [], "hooks": [], "ghost": []}
        ghost_error = ""
        for _ in range(repeats):  # interleaved, so background load hits each alike
            for mode in times:
                if mode == "ghost" and ghost_error:
                    continue
                try:
                    times[mode].append(_epoch(spec, view, mode))
                except Exception as e:  # a model ghost clipping does not support
                    ghost_error = f"{type(e).__name__}: {str(e)[:120]}"
        med = {m: statistics.median(t) for m, t in times.items() if t}
        row = {"model": model, "examples": len(view.y_train), "batch": spec.batch_size,
               **{f"{m}_s": round(v, 4) for m, v in med.items()},
               "r7_hooks": round(med["hooks"] / med["plain"], 2)}
        if "ghost" in med:
            row["r7_ghost"] = round(med["ghost"] / med["plain"], 2)
        else:
            row["ghost"] = ghost_error
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def flower(tmp: Path, poll: float, rounds: int, model: str) -> dict[str, Any]:
    """Rounds of a real 3-node federation; per-round timings from the ServerApp's records."""
    from federation._certs import make_certs
    from privacy import generate_board_keys
    from tests._training import start_training_federation

    certs = make_certs(tmp / "certs", [*NODES, "bulle-superlink"])
    board = tmp / "board"
    generate_board_keys(board)
    t0 = time.perf_counter()
    fed = start_training_federation(tmp, certs, board, NODES, {"bench": 100.0}, poll_s=poll,
                                    http=False)
    try:
        startup = time.perf_counter() - t0
        idle = _idle_cpu(fed, 10.0)
        trainer = fed.coordinator.trainer
        job = trainer.submit(fed.researcher, {**REQUEST, "model": model, "rounds": rounds,
                                              "epsilon": 8.0, "project": "bench"})
        t1 = time.perf_counter()
        job.done.wait(600)
        wall = time.perf_counter() - t1
        records = [json.loads(line) for line in
                   (job.out_dir / "progress.jsonl").read_text().splitlines()]
    finally:
        fed.close()
    start = next(r for r in records if r["type"] == "start")
    rows = [r for r in records if r["type"] == "round" and r.get("released")]
    parts = []
    for r in rows[1:]:  # round 1 also calibrates σ at each node
        slow = max(r["nodes"].values(), key=lambda n: n["train_s"])
        nodes = r["nodes"].values()
        parts.append({
            "round_s": r["round_s"], "train_s": slow["train_s"],
            "overhead_s": r["round_s"] - slow["train_s"],
            "queue_s": statistics.median(n["queue_s"] for n in nodes),
            "pull_s": statistics.median(n["pull_s"] for n in nodes),
            "task_other_s": statistics.median(n["task_s"] - n["pull_s"] - n["train_s"]
                                              for n in nodes),
            "back_s": statistics.median(n["reply_s"] - n["queue_s"] - n["task_s"]
                                        for n in nodes),
            "auth_ms": 1000 * max(n["auth_s"] for n in nodes)})
    med = {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]}
    out = {"poll_s": poll, "model": model, "rounds": len(rows), "status": job.status,
           "startup_s": round(startup, 1), "run_wall_s": round(wall, 2),
           "serverapp_setup_s": start["setup_s"], "idle_cpu_pct_of_a_core": idle, **med,
           "overhead_each_round": [round(p["overhead_s"], 3) for p in parts]}
    print(json.dumps(out), flush=True)
    return out


def auth_check(tmp: Path, repeats: int = 2000) -> dict[str, Any]:
    """Per-message cost of the run authorisation at a node, on a real spec and token."""
    from datetime import UTC, datetime, timedelta

    from nodes._training import authorise
    from privacy import (
        Grant,
        coordinator_keys,
        generate_board_keys,
        sign_grant,
        spec_json,
    )
    from privacy._grants import load_public_key

    generate_board_keys(tmp / "board")
    now = datetime.now(UTC)
    grant = sign_grant(Grant("bench", ("r",), ("student_assessment",), 10.0, 1e-6,
                             now + timedelta(days=1), "bench", now),
                       (tmp / "board" / "board_ed25519.pem").read_bytes())
    private, public = coordinator_keys(tmp / "coordinator_ed25519.pem")

    from federation._training import Trainer

    trainer = Trainer.__new__(Trainer)  # only its signing: no SuperLink
    trainer._signing_key = private.read_bytes()
    layout = [{"name": f, "kind": "num", "lo": 0, "hi": 300} for f in FEATURES]
    spec = {"job": "0" * 32, "project": "bench", "researcher": "r", "grant": grant,
            "model": "mlp", "hidden": 32, "table": "student_assessment",
            "joins": [["assessments", "id_assessment"]], "features": layout,
            "label": ["score", ">=", 70.0], "order_by": "date_submitted", "max_len": 8,
            "rounds": 6, "epochs": 1, "batch_size": 128, "lr": 0.3, "max_grad_norm": 1.0,
            "epsilon": 2.9, "epsilon_total": 8.0, "delta": 1e-6, "noise_multiplier": None,
            "eval_fraction": 0.2, "eval_share": 0.2, "bins": 4, "nodes": sorted(NODES),
            "min_nodes": 1, "round_timeout_s": 120.0, "seed": 0}
    t0 = time.perf_counter()
    token = trainer.authorise(spec)
    sign_ms = 1000 * (time.perf_counter() - t0)
    cfg = {"spec": spec_json(spec), "auth": token, "round": 3}
    key = load_public_key(public)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        authorise(cfg, "b1", key)
        times.append(time.perf_counter() - t)
    times.sort()
    out = {"auth_check_median_ms": round(1000 * statistics.median(times), 3),
           "auth_check_p99_ms": round(1000 * times[int(0.99 * len(times))], 3),
           "sign_once_per_run_ms": round(sign_ms, 3), "token_bytes": len(token),
           "spec_bytes": len(cfg["spec"]), "repeats": repeats}
    print(json.dumps(out), flush=True)
    return out


def _idle_cpu(fed: Any, seconds: float) -> float:
    """CPU used by the whole idle federation (SuperLink, agents, SuperNodes, executors)."""
    def tree_ticks() -> int:
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if str(fed.tmp).encode() in environ or any(
                    str(p.pid) == pid for p in fed.procs.values()):
                f = stat.rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])  # utime + stime
        return total

    time.sleep(2.0)
    a = tree_ticks()
    time.sleep(seconds)
    b = tree_ticks()
    return round(100.0 * (b - a) / os.sysconf("SC_CLK_TCK") / seconds, 1)


def r8(tmp: Path, flower_round_s: float, model: str, repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    modules = tuple(m for ms in NODES.values() for m in ms)
    spec, view = _views(model, modules, tmp)
    central = statistics.median(_epoch(spec, view, "hooks") for _ in range(repeats))
    out = {"model": model, "union_examples": len(view.y_train), "central_epoch_s":
           round(central, 3), "federated_round_s": flower_round_s,
           "r8": round(flower_round_s / central, 2)}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--poll", default="0.05,0.2", help="comma-separated poll intervals (s)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", default="mlp", help="model for the Flower rounds and R8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-r7", action="store_true")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--auth-only", action="store_true",
                        help="only the run authorisation check at a node")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(f"load average at start: {_load()}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bulle-bench-train-") as d:
        tmp = Path(d)
        (tmp / "auth").mkdir()
        results["auth"] = auth_check(tmp / "auth")
        if args.auth_only:
            return 0
        if not args.skip_r7:
            results["r7"] = r7(tmp / "r7", args.repeats)
        if not args.skip_flower:
            results["flower"] = []
            for poll in (float(p) for p in args.poll.split(",")):
                results["flower"].append(flower(tmp / f"fl-{poll}", poll, args.rounds,
                                                args.model))
            best = min(results["flower"], key=lambda r: r["round_s"])
            results["r8"] = r8(tmp / "r8", best["round_s"], args.model, args.repeats)
    print(f"load average at end: {_load()}", flush=True)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
