"""The vetted ServerApp: FedAvg over DP-SGD updates, rounds driven by our own loop.

It runs inside the coordinator's SuperLink (deployment mode). Its run config holds the
spec the nodes receive (``spec``, canonical JSON, passed on byte for byte), the run
authorisation the coordinator signed for it (``auth``: every message to a node carries it,
nodes act on nothing else) and what only this app needs (``server``: the output folder,
the nodes' Flower ids). It talks back to the coordinator through files in ``out_dir``
(same host): ``progress.jsonl`` gets one
JSON line per round and a final ``done`` line; ``round-<k>.pt`` holds the aggregated
state dict of round k. The coordinator charges its global ledger for a round before it
shows that round (weights or metrics) to the researcher.

Why our own loop: ``Grid.send_and_receive`` polls every 3 s (hard-coded); the public
``push_messages``/``pull_messages`` pair lets a round end as soon as the last reply lands.
Nodes report ε per node; this app never averages ε (FedAvg's default metric aggregation
would). Aggregation weights are the nodes' *noisy* training-set sizes (released with the
evaluation counts under the node's Gaussian noise), never exact counts.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from bulle_flower.models import build_model, pack, unpack
from bulle_flower.spec import TrainSpec

app = ServerApp()
POLL_S = float(os.environ.get("BULLE_SERVERAPP_POLL_S", "0.05"))
# Node errors that mean "this node's budget cannot pay for the round": the run stops
# there, nothing more is released (other errors only drop the node).
BUDGET_CODES = ("budget_exhausted",)


class _Progress:
    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._f = (out / "progress.jsonl").open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def save_model(self, rnd: int, state: dict[str, torch.Tensor]) -> str:
        name = f"round-{rnd}.pt"
        tmp = self.out / f".{name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / name)  # the coordinator never sees a half-written file
        return name


def hist_metrics(hist: list[float], bins: int) -> dict[str, float]:
    """Accuracy at 0.5 and ROC AUC from a noisy 2×bins histogram of predicted scores
    (row 0: label 0, row 1: label 1). Pure post-processing of released counts."""
    h = np.clip(np.asarray(hist, dtype=float).reshape(2, bins), 0.0, None)
    neg, pos = h[0], h[1]
    n = float(h.sum())
    if n <= 0:
        return {"n_eval": 0.0, "accuracy": float("nan"), "auc": float("nan")}
    half = bins // 2
    correct = neg[:half].sum() + pos[half:].sum()
    # AUC = P(score of a positive > score of a negative); ties inside a bin count half.
    p_tot, n_tot = pos.sum(), neg.sum()
    auc = float("nan")
    if p_tot > 0 and n_tot > 0:
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
        auc = float((pos * (below + 0.5 * neg)).sum() / (p_tot * n_tot))
    return {"n_eval": n, "accuracy": float(correct / n), "auc": auc}


def fedavg(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: torch.from_numpy(sum(w / total * s[k] for s, w in zip(states, weights, strict=True))
                                .astype(np.float32))
            for k in states[0]}


@app.main()
def main(grid: Grid, context: Context) -> None:
    from bulle_flower._patches import cap_pull_backoff

    cap_pull_backoff(cap=0.2)  # a reply is visible before its objects: do not wait 1 s+
    node_spec, auth = str(context.run_config["spec"]), str(context.run_config["auth"])
    server = json.loads(str(context.run_config["server"]))
    progress = _Progress(Path(server["out_dir"]))
    try:
        spec = TrainSpec.from_dict(json.loads(node_spec))  # the nodes check it again
        _train(grid, spec, node_spec, auth, server["nodes"], progress)
    except Exception as e:  # the coordinator must always learn how the run ended
        progress.write({"type": "done", "status": "failed",
                        "reason": f"server app error: {type(e).__name__}: {e}"[:500],
                        "trace": traceback.format_exc()[-2000:]})
        raise


def _exchange(grid: Grid, active: dict[str, int], arrays: ArrayRecord, config: ConfigRecord,
              rnd: int, timeout: float) -> tuple[dict, dict, dict, dict]:
    """Send one message per active node, collect replies until the last or ``timeout``.
    Returns (ok contents, failures, budget refusals, reply delays) by node name."""
    t0 = time.monotonic()
    sent = {name: Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=nid,
                          message_type="train", group_id=str(rnd), ttl=timeout + 60)
            for name, nid in sorted(active.items())}
    ids = list(grid.push_messages(list(sent.values())))
    ids += [""] * (len(sent) - len(ids))
    pending = {mid: name for mid, name in zip(ids, sent, strict=True) if mid}
    failed = {name: "the SuperLink did not take the message (node unknown or offline)"
              for mid, name in zip(ids, sent, strict=True) if not mid}
    replies: dict[str, Message] = {}
    delays: dict[str, float] = {}
    while pending and time.monotonic() < t0 + timeout:
        for reply in grid.pull_messages(list(pending)):
            name = pending.pop(reply.metadata.reply_to_message_id, None)
            if name is not None:
                replies[name] = reply
                delays[name] = time.time() - float(sent[name].metadata.created_at)
        if pending:
            time.sleep(POLL_S)
    failed.update({name: "no reply before the round timeout" for name in pending.values()})
    ok: dict[str, RecordDict] = {}
    budget: dict[str, str] = {}
    for name, reply in replies.items():
        if reply.has_error():
            why = str(reply.error.reason)[:300]
            (budget if why.startswith(BUDGET_CODES) else failed)[name] = why
        else:
            ok[name] = reply.content
    return ok, failed, budget, delays


def _node_records(ok: dict[str, RecordDict], delays: dict[str, float], bins: int
                  ) -> tuple[dict[str, Any], np.ndarray]:
    """Per-node public record (noisy counts, DP parameters, timings) and the summed
    histogram; ε stays per node (never averaged)."""
    nodes, total = {}, np.zeros(2 * bins)
    for name, content in sorted(ok.items()):
        m, dp = dict(content["metrics"]), dict(content["dp"])
        hist = [float(x) for x in m.pop("hist")]
        total += np.asarray(hist)
        nodes[name] = {**m, **hist_metrics(hist, bins), "hist": hist, **dp,
                       "reply_s": delays[name]}
    return nodes, total


def _train(grid: Grid, spec: TrainSpec, node_spec: str, auth: str,
           nodes: dict[str, int], progress: _Progress) -> None:
    started = time.monotonic()
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, spec.input_width, spec.hidden)
    template = model.state_dict()
    arrays = ArrayRecord({"w": torch.from_numpy(pack(template, template))})
    active = {k: int(v) for k, v in nodes.items()}  # minus nodes that failed
    run_id = grid.run.run_id
    bins, timeout = spec.bins, spec.round_timeout_s
    progress.write({"type": "start", "run_id": run_id, "nodes": sorted(active),
                    "setup_s": round(time.monotonic() - started, 3)})
    status, reason, done = "finished", "", 0
    # Round r: each node evaluates the incoming global model (of round r-1) and trains
    # from it; after the last round, one more exchange evaluates the final model (the
    # nodes know it from the round number: rounds + 1).
    for rnd in range(1, spec.rounds + 2):
        train = rnd <= spec.rounds
        t0 = time.monotonic()
        config = ConfigRecord({"spec": node_spec, "auth": auth, "round": rnd,
                               "run_id": str(run_id)})
        ok, failed, budget, delays = _exchange(grid, active, arrays, config, rnd, timeout)
        for name in (*failed, *budget):
            active.pop(name, None)
        record: dict[str, Any] = {"type": "round" if train else "eval", "round": rnd,
                                  "evaluates": rnd - 1, "failed": failed, "refused": budget,
                                  "round_s": round(time.monotonic() - t0, 4)}
        if budget or len(ok) < spec.min_nodes:
            # A node's ledger refused to pay, or too few answered: stop, release nothing.
            if budget:
                status, reason = "budget_exhausted", "; ".join(
                    f"{n}: {w}" for n, w in sorted(budget.items()))
            elif train:
                status = "failed"
                reason = (f"round {rnd}: {len(ok)} node(s) answered, {spec.min_nodes} "
                          "needed; " + "; ".join(f"{n}: {w}" for n, w in sorted(failed.items())))
            record["released"] = False
            progress.write(record)
            break
        nodes_out, total_hist = _node_records(ok, delays, bins)
        record.update(released=True, nodes=nodes_out, **hist_metrics(list(total_hist), bins))
        if train:
            states = [{"w": ok[n]["arrays"]["w"].numpy()} for n in sorted(ok)]
            weights = [max(float(nodes_out[n]["n_train_noisy"]), 1.0) for n in sorted(ok)]
            packed = fedavg(states, weights)
            arrays = ArrayRecord(packed)
            state = unpack(packed["w"].numpy(), template)
            record.update(model_file=progress.save_model(rnd, state),
                          train_s=max(float(n["train_s"]) for n in nodes_out.values()))
            done = rnd
        progress.write(record)
    progress.write({"type": "done", "status": status, "reason": reason, "rounds_done": done,
                    "elapsed_s": round(time.monotonic() - started, 3)})
