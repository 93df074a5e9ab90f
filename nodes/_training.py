"""DP-SGD training at the node: what the vetted ClientApp does for one round.

The node trusts nothing it receives. Before anything else, the message's run authorisation
(signed by the coordinator, ``privacy._runauth``) is verified: signature, validity window,
this node listed, the spec's hash, project and grant, the round within the run; a message
without a valid one is refused (audited), nothing is read, trained or charged. Then the run
spec is checked against this node's own catalogue (model allowed by the operator, table
and columns published here, joins only with open tables), the board-signed grant is
verified (``PrivacyGuard.admit``), and every round is charged to this node's ledger
*before* anything leaves:

1. build the training view on the locked DuckDB: one row (tabular models) or one sequence
   (GRU) per privacy unit, so one learner is one example (bounded contribution);
2. plan the noise once per run: σ of DP-SGD calibrated so the whole run fits within
   min(what the researcher asked, what the grant leaves at this node), given this node's
   ledger history for the project and dataset; evaluation counts get their own σ, and the
   final model's evaluation (the run's result) one √rounds smaller: it costs as much as
   all the rounds' evaluations together, so that the result is the least noisy figure;
3. train with Opacus (Poisson sampling, per-sample clipping, Gaussian noise), evaluate on
   held-out learners and noise the evaluation histogram (plus the training-set size);
4. charge ``opacus_event(history)`` + the evaluation's Gaussian event with request id
   ``<run>:<round>:<node>`` (``run`` from the signed authorisation: a replayed message is
   the same request); refused → an error reply, nothing released;
5. keep the release (a replayed round gets the same weights back, never new noise) and
   write the audit entry; return weights (``_module.`` stripped) and DP metrics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np

from bulle_flower.models import build_model, pack, strip_opacus_prefix, unpack
from federation.proto import bulle_pb2 as pb
from nodes._compile import PlanRefused
from nodes._config import NodeConfig
from nodes._guard import PrivacyGuard
from nodes._trainview import (
    SIGMA_RANGE,
    TrainingRefused,
    TrainSpec,
    View,
    build_view,
    check_spec,
    fetch_rows,
)
from privacy import (
    GrantError,
    RdpTotals,
    RunAuthorisation,
    canonical_sha256,
    event_from_dict,
    gaussian_event,
    gaussian_noise,
    grant_id,
    opacus_event,
    verify_run_authorisation,
)

__all__ = ["SIGMA_RANGE", "NodeRuntime", "TrainSpec", "TrainingRefused", "authorise", "bind",
           "build_view", "calibrate", "check_spec", "fetch_rows", "round_event",
           "sigma_for_eval", "train_round"]


# ------------------------------------------------------------------------ the node side


@dataclass
class NodeRuntime:
    """What the executor process holds for its forked tasks (bound before any fork)."""

    config: NodeConfig
    engine: Any  # nodes._engine.NodeEngine (locked DuckDB + catalogue meta)
    models: tuple[str, ...]
    state_dir: Path
    coordinator_key: Any = None  # Ed25519 public key of the run authorisations (None: none)

    @property
    def node_id(self) -> str:
        return self.config.node_id


_RUNTIME: NodeRuntime | None = None
# Wall-clock marks of the current task (set by the executor), reported for the benchmarks.
TIMES: dict[str, float] = {}


def bind(runtime: NodeRuntime) -> None:
    global _RUNTIME
    _RUNTIME = runtime


def _runtime() -> NodeRuntime:
    if _RUNTIME is None:
        raise RuntimeError("nodes._training.bind() was not called: not a node executor")
    return _RUNTIME


# --------------------------------------------------------------------------- accounting


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def round_event(sigma: float, sample_rate: float, steps: int, sigma_eval: float) -> dpa.DpEvent:
    return dpa.ComposedDpEvent([opacus_event([(sigma, sample_rate, steps)]),
                                gaussian_event(sigma_eval)])


def sigma_for_eval(rounds: int, epsilon: float, delta: float) -> float:
    """σ of the per-round evaluation release (L2 sensitivity 1) so that ``rounds`` of them
    cost ``epsilon`` at ``delta`` (RDP, by bisection)."""
    lo, hi = 0.05, 1e4
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        eps = RdpTotals().plus(dpa.SelfComposedDpEvent(gaussian_event(mid), rounds)).epsilon(delta)
        lo, hi = (mid, hi) if eps > epsilon else (lo, mid)
    return hi


def calibrate(prior: RdpTotals, cap: float, target: float, delta: float, sample_rate: float,
              steps: int, rounds: int, sigma_eval: float,
              sigma_final: float | None = None) -> float | None:
    """Smallest σ (within ``SIGMA_RANGE``) such that the run of ``rounds`` rounds costs at
    most ``target`` ε on its own and ``prior`` plus the run stays within ``cap`` (both at
    δ); None if even the largest σ does not fit. (RDP composition is sublinear: the run's
    own ε is larger than what it adds to a prior spend, so both are checked.) The final
    model's evaluation has σ ``sigma_final`` (default: ``sigma_eval``)."""
    def fits(sigma: float) -> bool:
        run = dpa.ComposedDpEvent([  # the rounds, then the final model's evaluation
            dpa.SelfComposedDpEvent(round_event(sigma, sample_rate, steps, sigma_eval), rounds),
            gaussian_event(sigma_final or sigma_eval)])
        return (RdpTotals().plus(run).epsilon(delta) <= target
                and prior.plus(run).epsilon(delta) <= cap)

    lo, hi = SIGMA_RANGE
    if not fits(hi):
        return None
    if fits(lo):
        return lo
    for _ in range(30):  # σ within 0.1 % is plenty
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        if hi / lo < 1.001:
            break
    return hi


# ---------------------------------------------------------------------- releases (cache)


class Releases:
    """Released rounds by request id: a replay gets the same bytes, never fresh noise."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS training_releases (request_id TEXT PRIMARY "
                        "KEY, arrays BLOB NOT NULL, metrics TEXT NOT NULL, dp TEXT NOT NULL, "
                        "created_at TEXT NOT NULL)")

    def get(self, request_id: str) -> tuple[dict[str, np.ndarray], dict, dict] | None:
        row = self.db.execute("SELECT arrays, metrics, dp FROM training_releases WHERE "
                              "request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        import io

        with np.load(io.BytesIO(row[0])) as z:
            arrays = {k: z[k] for k in z.files}
        return arrays, json.loads(row[1]), json.loads(row[2])

    def put(self, request_id: str, arrays: dict[str, np.ndarray], metrics: dict,
            dp: dict) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self.db.execute("INSERT OR IGNORE INTO training_releases VALUES (?, ?, ?, ?, ?)",
                        (request_id, buf.getvalue(), json.dumps(metrics), json.dumps(dp),
                         datetime.now(UTC).isoformat()))


def node_salt(state_dir: Path) -> bytes:
    """A node-local secret: which learners are held out is not predictable from outside."""
    path = state_dir / "training.salt"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


# ------------------------------------------------------------------ run authorisations


def authorise(cfg: Any, node_id: str, coordinator_key: Any, now: datetime | None = None
              ) -> tuple[RunAuthorisation, TrainSpec, int]:
    """Verify a training message's run authorisation before anything is read or trained:
    the coordinator's signature and validity window, this node listed, the spec being the
    one signed (hash), its run, project and grant the signed ones, its ε at most this
    node's target, the round within the run. Returns (authorisation, spec, round);
    ``TrainingRefused("unauthorised", …)`` otherwise."""
    def refuse(why: str) -> TrainingRefused:
        return TrainingRefused("unauthorised", why)

    if coordinator_key is None:
        raise refuse(f"node {node_id} has no coordinator key configured: it trains nothing")
    if "auth" not in cfg or "spec" not in cfg:
        raise refuse("the message carries no run authorisation")
    try:
        auth = verify_run_authorisation(str(cfg["auth"]), coordinator_key,
                                        now or datetime.now(UTC))
    except GrantError as e:
        raise refuse(f"run authorisation refused ({e.code})") from None
    target = auth.epsilon_for(node_id)
    if target is None:
        raise refuse(f"the run authorisation does not name node {node_id}")
    try:
        raw = json.loads(str(cfg["spec"]))
        digest = canonical_sha256(raw)
    except (TypeError, ValueError):
        raise refuse("the spec is not canonical JSON") from None
    if digest != auth.spec_sha256:
        raise refuse("the spec is not the one the run authorisation signs")
    spec = TrainSpec.parse(raw)
    if spec.job != auth.run or spec.project != auth.project:
        raise refuse("the spec's run or project is not the authorised one")
    if grant_id(spec.grant) != auth.grant:
        raise refuse("the spec's grant is not the authorised one")
    if spec.epsilon > target * (1 + 1e-9):
        raise refuse("the spec's ε exceeds this node's authorised target")
    try:
        rnd = int(cfg["round"])
    except (KeyError, TypeError, ValueError):
        raise refuse("the message has no round") from None
    if not 1 <= rnd <= spec.rounds + 1:  # rounds + 1: the final model's evaluation
        raise refuse(f"round {rnd} is not a round of this run")
    return auth, spec, rnd


# ----------------------------------------------------------------------------- the round


def _admit_plan(spec: TrainSpec) -> pb.Plan:
    # The guard's grant check takes a Plan: the same rules as for DP queries.
    plan = pb.Plan(project=spec.project, researcher=spec.researcher)
    plan.privacy.grant, plan.privacy.delta = spec.grant, spec.delta
    return plan


def _failpoint(stage: str, rnd: int, project: str) -> None:
    """Crash hooks for tests: BULLE_TRAIN_FAILPOINT="<stage>:<round>:<project>" ends this
    task; "die-<stage>:…" kills the node's executor too (the node is gone mid-round)."""
    point = os.environ.get("BULLE_TRAIN_FAILPOINT", "")
    if point == f"die-{stage}:{rnd}:{project}":
        os.kill(os.getppid(), 9)
    if point in (f"{stage}:{rnd}:{project}", f"die-{stage}:{rnd}:{project}"):
        os._exit(87)


def train_round(msg: Any, context: Any) -> Any:
    """The ClientApp's train handler (runs in a forked task process of the executor)."""
    from flwr.app import Error, Message

    rt = _runtime()
    cfg = msg.content["config"]
    guard = PrivacyGuard(rt.node_id, rt.state_dir, rt.config.board_public_key)
    spec: TrainSpec | None = None
    rnd, request_id = 0, ""

    def audit(action: str, **detail: Any) -> None:
        who = spec.researcher[:128] if spec else "?"
        guard.audit.append(who, spec.project[:128] if spec else "?", action, {
            "node": rt.node_id, "request_id": request_id, "round": rnd,
            "job": spec.job if spec else "", "table": spec.table if spec else "", **detail})

    try:
        t0 = time.perf_counter()
        try:  # before anything is read: the run must be authorised by the coordinator
            auth, spec, rnd = authorise(cfg, rt.node_id, rt.coordinator_key)
        except TrainingRefused as e:
            spec = None  # what the message claims is not trusted, nor audited as its own
            audit("train_refused", reason=str(e)[:300], unauthorised=e.code == "unauthorised",
                  flower_run=str(msg.metadata.run_id))
            return Message(Error(code=0, reason=str(e)[:500]), reply_to=msg)
        TIMES["auth_s"] = time.perf_counter() - t0
        request_id = f"{auth.run}:{rnd}:{rt.node_id}"
        run_id = auth.run
        where = check_spec(spec, rt.engine.meta, rt.models)
        try:
            grant = guard.admit(_admit_plan(spec), spec.table)
        except PlanRefused as e:
            raise TrainingRefused("refused", str(e)) from None
        releases = Releases(rt.state_dir / "training.sqlite")
        cached = releases.get(request_id)
        if cached is not None:
            arrays, metrics, dp = cached
            audit("train_replayed", epsilon=dp["epsilon_round"])
            return _reply(msg, arrays, metrics, dp)
        history = guard.ledger.history(spec.project, spec.table)
        if any(h.request_id == request_id for h in history):
            raise TrainingRefused("refused", "this round was charged before but its release "
                                  "never left the node: it is not trained again")
        train = rnd <= spec.rounds  # the round after the last: the final model's evaluation
        event, metrics, dp, arrays = _train(spec, rt, where, run_id, history, grant.epsilon,
                                            context, msg, train)
        _failpoint("before-charge", rnd, spec.project)
        outcome = guard.ledger.charge(request_id, spec.project, spec.table, event,
                                      epsilon_claim=dp["epsilon_round_planned"])
        if not outcome.accepted:
            audit("train_refused", reason=outcome.reason[:300],
                  needed=outcome.needed_epsilon, remaining=outcome.remaining_epsilon)
            raise TrainingRefused(
                "budget_exhausted",
                f"node {rt.node_id}: the budget of project {spec.project!r} on "
                f"{spec.table!r} cannot pay for round {rnd} (needs ε="
                f"{outcome.needed_epsilon:.4g}, {outcome.remaining_epsilon:.4g} left)")
        _failpoint("after-charge", rnd, spec.project)
        dp.update(epsilon_round=outcome.needed_epsilon, epsilon_spent=outcome.spent_epsilon,
                  epsilon_remaining=outcome.remaining_epsilon)
        releases.put(request_id, arrays, metrics, dp)
        audit("train_released", epsilon=outcome.needed_epsilon,
              epsilon_spent=outcome.spent_epsilon, sigma=dp["sigma"],
              sample_rate=dp["sample_rate"], steps=dp["steps"], sigma_eval=dp["sigma_eval"])
        return _reply(msg, arrays, metrics, dp)
    except TrainingRefused as e:
        if e.code != "budget_exhausted":  # that one was audited with the ledger's numbers
            audit("train_refused", reason=str(e)[:300])
        return Message(Error(code=0, reason=str(e)[:500]), reply_to=msg)
    finally:
        guard.audit.close()


def _reply(msg: Any, arrays: dict[str, np.ndarray], metrics: dict, dp: dict) -> Any:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    # the run authorisation's check at this node, this message (≤ 10 ms: benchmarks)
    metrics = {**metrics, "auth_s": TIMES.get("auth_s", 0.0)}
    if "forked" in TIMES:  # where a round's time goes (benchmarks/bench_training.py)
        now = time.time()
        metrics = {**metrics, "queue_s": TIMES["forked"] - float(msg.metadata.created_at),
                   "pull_s": TIMES.get("pulled", now) - TIMES["forked"],
                   "task_s": now - TIMES["forked"]}
        marks = ["pulled", "started", "fetched", "view", "evaluated", "trained"]
        for a, b in itertools.pairwise(marks):
            if a in TIMES and b in TIMES:
                metrics[f"t_{b}_s"] = TIMES[b] - TIMES[a]

    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.from_numpy(pack(arrays, arrays))} if arrays else {}),
        "metrics": MetricRecord(metrics),
        "dp": ConfigRecord(dp),
    })
    return Message(content, reply_to=msg)


def _train(spec: TrainSpec, rt: NodeRuntime, where: dict[str, str], run_id: str,
           history: list[Any], cap: float, context: Any, msg: Any, train: bool
           ) -> tuple[dpa.DpEvent, dict, dict, dict[str, np.ndarray]]:
    """Evaluate the incoming global model on held-out learners and, if ``train``, run one
    round of DP-SGD from it. Returns the event to charge and what to release after."""
    import torch

    started = time.perf_counter()
    TIMES["started"] = time.time()
    # A forked child inherits its parent's RNG state: re-seed from the OS, or every task
    # would draw the same DP noise.
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    torch.set_num_threads(1)
    salt = node_salt(rt.state_dir)
    meta = rt.engine.meta[spec.table]
    rows = fetch_rows(rt.engine.cursor(), spec, meta.privacy_unit, where)
    TIMES["fetched"] = time.time()
    view_seed = int.from_bytes(hashlib.sha256(salt + run_id.encode()).digest()[:8], "big")
    view = build_view(rows, spec, salt, np.random.default_rng(view_seed))
    TIMES["view"] = time.time()
    n = len(view.y_train)
    if n < 2 * spec.batch_size and n < 100:
        raise TrainingRefused("too_small", "too few learners at this node for DP training")
    plan, prior = _noise_plan(spec, rt, context, history, cap)
    sigma_eval = float(plan["sigma_eval"] if train else plan.get("sigma_final",
                                                                  plan["sigma_eval"]))

    model = build_model(spec.model, spec.input_width, spec.hidden, dp=True)
    try:
        model.load_state_dict(unpack(msg.content["arrays"]["w"].numpy(), model.state_dict()))
    except (KeyError, RuntimeError, ValueError) as e:
        raise TrainingRefused("bad_spec", f"the global weights do not fit the model ({e})") \
            from None
    # Evaluation of the global model: a 2×bins histogram of its scores on held-out learners
    # (plus, in a training round, the training-set size for FedAvg's weights). One learner
    # changes one cell by one: L2 sensitivity 1, Gaussian noise σ_eval.
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.from_numpy(view.x_eval))).numpy() \
            if len(view.y_eval) else np.zeros(0)
    cells = np.minimum((scores * spec.bins).astype(int), spec.bins - 1)
    exact = np.zeros(2 * spec.bins + (1 if train else 0))
    np.add.at(exact, view.y_eval.astype(int) * spec.bins + cells, 1.0)
    if train:
        exact[-1] = n
    noisy = gaussian_noise(exact.tolist(), sigma_eval)
    events: list[dpa.DpEvent] = [gaussian_event(sigma_eval)]
    arrays: dict[str, np.ndarray] = {}
    dp_history: list[tuple[float, float, int]] = []
    TIMES["evaluated"] = time.time()
    if train:
        if "sigma" not in plan:  # the run's first round here: the sampling plan
            _sampling_plan(spec, rt, plan, prior, cap, float(noisy[-1]), context)
        dp_history, arrays = _dp_sgd(spec, model, view, float(plan["sigma"]),
                                     int(plan["steps_epoch"]))
        events.insert(0, opacus_event(dp_history))
    TIMES["trained"] = time.time()
    event = dpa.ComposedDpEvent(events)
    run_eps = RdpTotals()  # this run's events at this node (all rounds alike: one RDP)
    for h in history:
        if h.accepted and h.request_id.startswith(f"{run_id}:"):
            run_eps.add(event_from_dict(h.event))
    run_eps.add(event)
    metrics = {"hist": [float(v) for v in noisy[:2 * spec.bins]],
               "train_s": round(time.perf_counter() - started, 4)}
    if train:
        metrics["n_train_noisy"] = float(noisy[-1])
    dp = {"node": rt.node_id, "sigma": float(plan.get("sigma", 0.0)) if train else 0.0,
          "sample_rate": 1.0 / float(plan.get("steps_epoch", 1)),
          "steps": int(sum(h[2] for h in dp_history)), "sigma_eval": sigma_eval,
          "delta": spec.delta,
          "epsilon_round_planned": RdpTotals().plus(event).epsilon(spec.delta),
          "epsilon_run": run_eps.epsilon(spec.delta),
          "epsilon_available": float(plan["epsilon_available"]),
          "history": json.dumps(dp_history)}
    return event, metrics, dp, arrays


def _noise_plan(spec: TrainSpec, rt: NodeRuntime, context: Any, history: list[Any],
                cap: float) -> tuple[dict[str, Any], RdpTotals]:
    """The run's budget at this node (kept in the run's context: a second run starts from
    what the ledger holds when it starts) and σ of the evaluations."""
    state = context.state
    plan = dict(state["bulle"]) if "bulle" in state else {}
    prior = RdpTotals()
    if plan.get("job") == spec.job and "sigma" in plan:
        return plan, prior  # (prior is only needed to plan)
    for h in history:
        if h.accepted:
            prior.add(event_from_dict(h.event))
    if plan.get("job") == spec.job:
        return plan, prior
    spent = prior.epsilon(spec.delta) if history else 0.0
    available = min(spec.epsilon, cap - spent)
    if available <= 0:
        raise TrainingRefused("budget_exhausted", f"node {rt.node_id}: no budget left for "
                              f"project {spec.project!r} on {spec.table!r}")
    # the rounds' evaluations and the final one, which weighs as much as all of them
    sigma_eval = sigma_for_eval(2 * spec.rounds, spec.eval_share * available, spec.delta)
    plan = {"job": spec.job, "epsilon_available": float(available), "sigma_eval": sigma_eval,
            "sigma_final": sigma_eval / math.sqrt(spec.rounds)}
    return plan, prior


def _sampling_plan(spec: TrainSpec, rt: NodeRuntime, plan: dict[str, Any], prior: RdpTotals,
                   cap: float, n_noisy: float, context: Any) -> None:
    """Steps per epoch and σ of DP-SGD, fixed at the run's first round. The sampling rate
    comes from the *noisy* training-set size released in that round, so that q and the
    step count, which travel in clear for the accounting, never reveal the exact count."""
    from flwr.app import ConfigRecord

    steps_epoch = max(1, round(max(n_noisy, spec.batch_size) / spec.batch_size))
    sigma = spec.noise_multiplier or calibrate(
        prior, cap, float(plan["epsilon_available"]), spec.delta, 1.0 / steps_epoch,
        steps_epoch * spec.epochs, spec.rounds, float(plan["sigma_eval"]),
        float(plan["sigma_final"]))
    if sigma is None:
        raise TrainingRefused("budget_exhausted", f"node {rt.node_id}: the budget left "
                              f"(ε={plan['epsilon_available']:.4g}) cannot pay for "
                              f"{spec.rounds} rounds")
    plan.update(sigma=float(sigma), steps_epoch=int(steps_epoch))
    context.state["bulle"] = ConfigRecord(plan)


def _dp_sgd(spec: TrainSpec, model: Any, view: View, sigma: float, steps_epoch: int
            ) -> tuple[list[tuple[float, float, int]], dict[str, np.ndarray]]:
    """One round of DP-SGD (Opacus: Poisson sampling at q = 1/steps_epoch, per-sample
    clipping, Gaussian noise)."""
    import torch
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.from_numpy(view.x_train), torch.from_numpy(view.y_train))
    loader = DPDataLoader(data, sample_rate=1.0 / steps_epoch)  # len = steps_epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    model.train()  # Opacus checks the mode
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=spec.max_grad_norm, poisson_sampling=False)  # already Poisson
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(spec.epochs):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can give an empty batch (TRAPS.md)
                continue
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
    history = [(float(a), float(b), int(c)) for a, b, c in engine.accountant.history]
    state = strip_opacus_prefix(model.state_dict())
    return history, {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()}
