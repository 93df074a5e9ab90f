"""DP training from a notebook: ``job = hub.train(...)``, ``job.result()``, ``job.cancel()``.

The SDK only talks HTTP to the coordinator; torch is imported when the weights are
loaded. Metrics are the nodes' *noisy* evaluation counts turned into accuracy and AUC;
ε is reported per node and composed over nodes for the run (never averaged). The run's
result is ``evaluation``: the released model's own noisy evaluation (charged like a
round), next to ``metrics``, the per-round history.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from enclave._client import Hub

FINAL = ("finished", "failed", "cancelled", "budget_exhausted")


@dataclass
class TrainingResult:
    """What a finished (or stopped) training released."""

    state_dict: dict[str, Any]  # torch tensors of the last released round
    metrics: pd.DataFrame  # one row per released round: noisy accuracy, AUC, ε
    epsilon: float  # the run's ε, composed over nodes and rounds
    epsilon_per_node: dict[str, float]  # each node's own ε for this run
    status: str
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    # the released model's noisy evaluation: accuracy, auc, n_eval (summed over nodes),
    # per node, and its ε; None when the run stopped before it (budget, failure)
    evaluation: dict[str, Any] | None = None

    def model(self) -> Any:
        """The trained model (``bulle_flower.models``), ready for inference."""
        from bulle_flower.models import build_model
        from bulle_flower.spec import input_width

        i = self.info
        m = build_model(i["model"], input_width(i["model"], i["layout"], i["order_by"]),
                        i["hidden"], dp=True)
        m.load_state_dict(self.state_dict)
        return m.eval()


class TrainingJob:
    """A DP training run on the federation (see ``Hub.train``)."""

    def __init__(self, hub: Hub, body: dict[str, Any]) -> None:
        self._hub = hub
        self.id: str = body["id"]
        self._last = body

    def __repr__(self) -> str:
        s = self._last
        return (f"TrainingJob({self.id[:8]}, {s['model']} on {s['table']}, {s['status']}, "
                f"{s['rounds_done']}/{s['rounds_planned']} rounds)")

    def status(self, wait_s: float = 0.0, after_round: int = -1) -> dict[str, Any]:
        self._last = self._hub._check(self._hub._http.get(
            f"/v1/trainings/{self.id}", params={"wait_s": wait_s, "after_round": after_round}))
        return self._last

    def cancel(self) -> dict[str, Any]:
        """Stop the run; rounds already released stay released (and charged)."""
        self._last = self._hub._check(self._hub._http.post(f"/v1/trainings/{self.id}/cancel"))
        return self._last

    def wait(self, timeout: float | None = None, progress: bool = True) -> dict[str, Any]:
        started = time.monotonic()
        s = self._last
        bar = _Progress(s) if progress and s["status"] not in FINAL else None
        try:  # the bar shows at once ("0/5 rounds, starting") while the nodes get the run
            while s["status"] not in FINAL:
                if timeout is not None and time.monotonic() - started > timeout:
                    from enclave._client import BulleError

                    raise BulleError("timeout", f"training {self.id} still running after "
                                     f"{timeout:g} s")
                s = self.status(wait_s=10.0, after_round=s["rounds_done"])
                if bar is not None:
                    bar.show(s)
        finally:
            if bar is not None:
                bar.close()
        return s

    def result(self, timeout: float | None = None, progress: bool = True) -> TrainingResult:
        """Wait for the end; the weights of the last released round and the metrics."""
        s = self.wait(timeout, progress)
        if not s["rounds"]:
            from enclave._client import BulleError

            raise BulleError(s["status"], s["reason"] or "no round was released", s)
        import torch

        raw = self._hub._http.get(f"/v1/trainings/{self.id}/model")
        if raw.status_code != 200:
            self._hub._check(raw)
        state = torch.load(io.BytesIO(raw.content), weights_only=True)
        rows = [{"round": r["round"], "accuracy": r["accuracy"], "auc": r["auc"],
                 "n_eval": r["n_eval"], "epsilon": r["epsilon_spent"],
                 "nodes": ", ".join(sorted(r["nodes"])),
                 **{f"epsilon_{n}": v["epsilon_run"] for n, v in sorted(r["nodes"].items())}}
                for r in s["rounds"]]
        return TrainingResult(state, pd.DataFrame(rows), float(s["epsilon_spent"]),
                              dict(s["epsilon_per_node"]), s["status"], s["reason"], s,
                              s.get("evaluation"))


class _Progress:
    """Rounds released so far: ``tqdm.auto`` (a widget in a notebook, a bar in a terminal),
    on standard output (notebooks colour the error stream as an error)."""

    def __init__(self, s: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=max(s["rounds_planned"], 1), unit="round", file=sys.stdout,
                         desc=f"{s['model']} on {s['table']}", dynamic_ncols=True)
        self.show(s)

    def show(self, s: dict[str, Any]) -> None:
        last = s["rounds"][-1] if s["rounds"] else {}
        after = {"ε": f"{s['epsilon_spent']:.3g}", "status": s["status"]}
        if last.get("accuracy") is not None:
            after = {"acc": f"{last['accuracy']:.3f}", **after}
        self._bar.n = s["rounds_done"]
        self._bar.set_postfix(after, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def start_training(hub: Hub, **request: Any) -> TrainingJob:
    body = hub._check(hub._http.post("/v1/trainings", json={
        k: v for k, v in request.items() if v is not None}))
    return TrainingJob(hub, body)
