"""DP-SGD training at the node: what the vetted ClientApp does for one round.

The node trusts nothing it receives. Before anything else, the message's run authorisation
(signed by the coordinator, ``privacy._runauth``) is verified: signature, validity window,
this node listed, the spec's hash, project and grant, the round within the run; a message
without a valid one is refused (audited), nothing is read, trained or charged. Then the run
spec is checked against this node's own catalogue (model allowed by the operator, table
and columns published here, joins only with open tables), the board-signed grant is
verified (``PrivacyGuard.admit``) and the incoming weights must fit the model. These
checks cost nothing. Then, as for a DP query (``nodes/_guard.py``), every round is charged
to this node's ledger *before* its data is read, atomically and idempotently:

1. the run's plan at this node, drawn once and kept (``plans``, ``nodes/_releases.py``: a
   retry or a replay of any round reuses it, never draws it again). Its budget is min(what the
   researcher asked, what the grant leaves here given the ledger). The evaluations get σ
   from a share of it (the final model's evaluation one √rounds smaller: it costs as much
   as all the rounds' evaluations together, so the result is the least noisy figure);
   DP-SGD's sampling rate comes from a noisy training-set size — a count charged *before*
   the data is read (request id ``<run>:0:<node>``, no message has round 0) — and its σ
   is the smallest with which the whole run, count included, fits;
2. charge the round's event, known from the plan alone — DP-SGD (σ, q, the planned steps)
   and the evaluation's Gaussian — with request id ``<run>:<round>:<node>`` (``run`` from
   the signed authorisation: a replayed message is the same request). Refused → an error
   reply, nothing read, nothing trained. Accepted → audited (``train_charged``) and it
   stands whatever happens next: a round that fails is charged, never free;
3. build the training view on the locked DuckDB: one row (tabular models) or one sequence
   (GRU) per privacy unit, so one learner is one example (bounded contribution); evaluate
   the incoming model on held-out learners and noise the evaluation histogram (plus the
   training-set size), then train with Opacus (Poisson sampling, per-sample clipping,
   Gaussian noise);
4. keep the release (a replayed round gets the same weights back, never new noise) and
   write the audit entry; return weights (``_module.`` stripped) and DP metrics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import secrets
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
from nodes._releases import TRAINING, ReleaseStore
from nodes._trainview import (
    TrainingRefused,
    TrainSpec,
    View,
    build_view,
    check_spec,
    fetch_rows,
    parse_spec,
)
from privacy import (
    ChargeResult,
    GrantError,
    LedgerError,
    RdpTotals,
    RunAuthorisation,
    calibrate,
    canonical_sha256,
    event_from_dict,
    gaussian_event,
    gaussian_noise,
    grant_id,
    opacus_event,
    sigma_for_eval,
    verify_run_authorisation,
)

__all__ = ["NodeRuntime", "TrainSpec", "TrainingRefused", "authorise", "bind", "build_view",
           "check_spec", "fetch_rows", "train_round"]


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
# One round's marks in TIMES, cleared when it starts (a process may run several rounds)
_MARKS = ("plan_charged", "charged", "started", "fetched", "view", "evaluated", "trained")
PLAN_ROUND = 0  # request id "<run>:0:<node>": the count behind the run's plan (no message)


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


# ---------------------------------------------------------------------- releases (cache)


def kept_round(store: ReleaseStore, request_id: str
               ) -> tuple[dict[str, np.ndarray], dict, dict] | None:
    """A released round from the node's release cache: (arrays, metrics, dp)."""
    kept = store.get(request_id)
    if kept is None:
        return None
    import io

    with np.load(io.BytesIO(kept[0])) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, kept[1]["metrics"], kept[1]["dp"]


def keep_round(store: ReleaseStore, request_id: str, arrays: dict[str, np.ndarray],
               metrics: dict, dp: dict) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.put(request_id, TRAINING, buf.getvalue(), {"metrics": metrics, "dp": dp})


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
    spec = parse_spec(raw)
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


class _AuditedRefusal(TrainingRefused):
    """A refusal already in the audit log, with the ledger's figures."""


def _failpoint(stage: str, rnd: int, project: str) -> None:
    """Crash hooks for tests: BULLE_TRAIN_FAILPOINT="<stage>:<round>:<project>" ends this
    task; "die-<stage>:…" kills the node's executor too (the node is gone mid-round);
    "raise-<stage>:…" raises in the task (the round's code failing, in-process tests)."""
    point = os.environ.get("BULLE_TRAIN_FAILPOINT", "")
    where = f"{stage}:{rnd}:{project}"
    if point == f"raise-{where}":
        raise RuntimeError(f"failpoint {where}")
    if point == f"die-{where}":
        os.kill(os.getppid(), 9)
    if point in (where, f"die-{where}"):
        os._exit(87)


def train_round(msg: Any, context: Any) -> Any:
    """The ClientApp's train handler (runs in a forked task process of the executor).

    Free checks first, then the round's charge, then its data (see the module docstring);
    ``context`` is unused: the run's plan is kept in the node's own state, so that a replay
    from another Flower run finds it too."""
    from flwr.app import Error, Message

    rt = _runtime()
    cfg = msg.content["config"]
    guard = PrivacyGuard(rt.node_id, rt.state_dir, rt.config.board_public_key)
    spec: TrainSpec | None = None
    rnd, request_id = 0, ""
    charged: list[str] = []  # what this task charged: it stands, whatever happens next
    for mark in _MARKS:
        TIMES.pop(mark, None)

    def audit(action: str, **detail: Any) -> None:
        who = spec.researcher[:128] if spec else "?"
        guard.audit.append(who, spec.project[:128] if spec else "?", action, {
            "node": rt.node_id, "request_id": request_id, "round": rnd,
            "job": spec.job if spec else "", "table": spec.table if spec else "", **detail})

    def replayed(release: tuple[dict[str, np.ndarray], dict, dict]) -> Any:
        arrays, metrics, dp = release
        audit("train_replayed", epsilon=dp["epsilon_round"])
        return _reply(msg, arrays, metrics, dp)

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
        releases = guard.releases  # the node's one release cache (queries and rounds)
        cached = kept_round(releases, request_id)
        if cached is not None:
            return replayed(cached)
        history = guard.ledger.history(spec.project, spec.table)
        if any(h.request_id == request_id for h in history):
            raise TrainingRefused("refused", "this round was charged before but its release "
                                  "never left the node: it is not trained again")
        train = rnd <= spec.rounds  # the round after the last: the final model's evaluation
        model = _incoming_model(spec, msg)  # a static check: costs nothing
        plan, view, count = _run_plan(spec, rt, guard, releases, run_id, history,
                                      grant.epsilon, where, audit, charged)
        event, dp = _round_event(spec, plan, train, rt.node_id)
        _failpoint("before-charge", rnd, spec.project)
        outcome = _pay(guard, request_id, spec, event, dp["epsilon_round_planned"], audit,
                       f"round {rnd}")
        if outcome.replay:  # a twin task charged it first: its release, never a 2nd draw
            cached = kept_round(releases, request_id)
            if cached is None:
                raise TrainingRefused("refused", "this round is charged and trained by "
                                      "another task: it is not trained twice")
            return replayed(cached)
        charged.append(request_id)
        TIMES["charged"] = time.time()
        audit("train_charged", charge=request_id, epsilon=outcome.needed_epsilon,
              epsilon_spent=outcome.spent_epsilon, epsilon_remaining=outcome.remaining_epsilon)
        _failpoint("after-charge", rnd, spec.project)
        metrics, arrays = _train(spec, rt, where, run_id, plan, view, model, train, rnd)
        dp.update(_round_spend(spec, plan, run_id, history, event, count, outcome))
        keep_round(releases, request_id, arrays, metrics, dp)
        audit("train_released", epsilon=outcome.needed_epsilon,
              epsilon_spent=outcome.spent_epsilon, sigma=dp["sigma"],
              sample_rate=dp["sample_rate"], steps=dp["steps"], sigma_eval=dp["sigma_eval"])
        return _reply(msg, arrays, metrics, dp)
    except TrainingRefused as e:
        if not isinstance(e, _AuditedRefusal):
            audit("train_refused", reason=str(e)[:300], charged=charged)
        return Message(Error(code=0, reason=str(e)[:500]), reply_to=msg)
    except Exception:
        if charged:  # the charge stands; the error's text may quote data: the node's log
            audit("train_failed", charged=charged)
        raise
    finally:
        guard.audit.close()


def _round_event(spec: TrainSpec, plan: dict[str, Any], train: bool, node_id: str
                 ) -> tuple[Any, dict[str, Any]]:
    """The round's DP event from the run's plan alone (known before any data is read), and
    the release's DP facts it fixes."""
    sigma_eval = float(plan["sigma_eval"] if train else plan["sigma_final"])
    dp_history = [(float(plan["sigma"]), 1.0 / int(plan["steps_epoch"]),
                   int(plan["steps_epoch"]) * spec.epochs)] if train else []
    event = dpa.ComposedDpEvent([opacus_event(dp_history), gaussian_event(sigma_eval)]
                                if train else [gaussian_event(sigma_eval)])
    return event, {
        "node": node_id, "sigma": float(plan["sigma"]) if train else 0.0,
        "sample_rate": 1.0 / int(plan["steps_epoch"]),
        "steps": int(sum(h[2] for h in dp_history)), "sigma_eval": sigma_eval,
        "delta": spec.delta,
        "epsilon_round_planned": RdpTotals().plus(event).epsilon(spec.delta),
        "epsilon_available": float(plan["epsilon_available"]),
        "history": json.dumps(dp_history)}


def _round_spend(spec: TrainSpec, plan: dict[str, Any], run_id: str, history: list[Any],
                 event: Any, count: Any, outcome: Any) -> dict[str, Any]:
    """What the round cost at this node: its charge, the run's ε so far (all rounds alike:
    one RDP) and the plan's count, charged by this round's task (the coordinator composes
    it)."""
    run_eps = RdpTotals()
    for h in history:
        if h.accepted and h.request_id.startswith(f"{run_id}:"):
            run_eps.add(event_from_dict(h.event))
    if count is not None:
        run_eps.add(gaussian_event(float(plan["sigma_count"])))
    run_eps.add(event)
    return {"sigma_count": float(plan["sigma_count"]) if count is not None else 0.0,
            "epsilon_count": count.needed_epsilon if count is not None else 0.0,
            "epsilon_run": run_eps.epsilon(spec.delta),
            "epsilon_round": outcome.needed_epsilon,
            "epsilon_spent": outcome.spent_epsilon,
            "epsilon_remaining": outcome.remaining_epsilon}


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


def _pay(guard: PrivacyGuard, request_id: str, spec: TrainSpec, event: dpa.DpEvent,
         claim: float, audit: Any, what: str) -> ChargeResult:
    """Charge ``event`` to this node's ledger before what it pays for runs. Refused:
    audited with the ledger's figures, and ``TrainingRefused("budget_exhausted")``."""
    try:
        outcome = guard.ledger.charge(request_id, spec.project, spec.table, event,
                                      epsilon_claim=claim)
    except LedgerError:  # the id was charged with another event (a twin planned otherwise)
        raise TrainingRefused("refused", "this request was charged before: it is not run "
                              "again") from None
    if not outcome.accepted:
        audit("train_refused", reason=outcome.reason[:300], charge=request_id,
              needed=outcome.needed_epsilon, remaining=outcome.remaining_epsilon)
        raise _AuditedRefusal(
            "budget_exhausted",
            f"node {guard.node_id}: the budget of project {spec.project!r} on {spec.table!r} "
            f"cannot pay for {what} (needs ε={outcome.needed_epsilon:.4g}, "
            f"{outcome.remaining_epsilon:.4g} left)")
    return outcome


def _incoming_model(spec: TrainSpec, msg: Any) -> Any:
    """The model with the global weights the message carries (they must fit the spec's
    model: checked before any charge, it depends on no data)."""
    model = build_model(spec.model, spec.input_width, spec.hidden, dp=True)
    try:
        model.load_state_dict(unpack(msg.content["arrays"]["w"].numpy(), model.state_dict()))
    except (KeyError, RuntimeError, ValueError) as e:
        raise TrainingRefused("bad_spec", f"the global weights do not fit the model ({e})") \
            from None
    return model


def _read_view(spec: TrainSpec, rt: NodeRuntime, where: dict[str, str], run_id: str) -> View:
    """The run's training view (read only once its round, or its plan, is charged)."""
    salt = node_salt(rt.state_dir)
    meta = rt.engine.meta[spec.table]
    rows = fetch_rows(rt.engine.cursor(), spec, meta.privacy_unit, where)
    TIMES["fetched"] = time.time()
    view_seed = int.from_bytes(hashlib.sha256(salt + run_id.encode()).digest()[:8], "big")
    view = build_view(rows, spec, salt, np.random.default_rng(view_seed))
    TIMES["view"] = time.time()
    return view


def _run_plan(spec: TrainSpec, rt: NodeRuntime, guard: PrivacyGuard, releases: ReleaseStore,
              run_id: str, history: list[Any], cap: float, where: dict[str, str], audit: Any,
              charged: list[str]
              ) -> tuple[dict[str, Any], View | None, ChargeResult | None]:
    """The run's plan at this node: the kept one, or drawn now (module docstring, 1.).

    Its budget: min(what the researcher asked, what the grant leaves here given the
    ledger when the run starts). Then σ of the evaluations, and DP-SGD's sampling rate
    from a *noisy* training-set size — so that q and the step count, which travel in
    clear for the accounting, never reveal the exact count — charged before the data is
    read, and σ of DP-SGD so that the whole run fits. Returns (plan, the view read for the
    count or None, the count's charge or None)."""
    plan = releases.plan(run_id)
    if plan is not None:
        return plan, None, None
    count_id = f"{run_id}:{PLAN_ROUND}:{rt.node_id}"
    if any(h.request_id == count_id for h in history):  # charged, never kept (a crash)
        raise TrainingRefused("refused", "this run's plan was charged here but never kept: "
                              "it is not drawn again")
    prior = RdpTotals()
    for h in history:
        if h.accepted:
            prior.add(event_from_dict(h.event))
    spent = prior.epsilon(spec.delta) if history else 0.0
    available = min(spec.epsilon, cap - spent)
    if available <= 0:
        raise TrainingRefused("budget_exhausted", f"node {rt.node_id}: no budget left for "
                              f"project {spec.project!r} on {spec.table!r}")
    # the count, the rounds' evaluations and the final one (which weighs as much as all of
    # them): 2 × rounds + 1 Gaussian releases of σ_eval within the evaluations' share
    sigma_eval = sigma_for_eval(2 * spec.rounds + 1, spec.eval_share * available, spec.delta)
    count = gaussian_event(sigma_eval)
    outcome = _pay(guard, count_id, spec, count, RdpTotals().plus(count).epsilon(spec.delta),
                   audit, "this run's plan (its training-set count)")
    if outcome.replay:  # a twin task drew it: its plan, never a second draw
        plan = releases.plan(run_id)
        if plan is None:
            raise TrainingRefused("refused", "this run's plan is being drawn by another task")
        return plan, None, None
    charged.append(count_id)
    TIMES["plan_charged"] = time.time()
    audit("train_charged", charge=count_id, epsilon=outcome.needed_epsilon,
          epsilon_spent=outcome.spent_epsilon, epsilon_remaining=outcome.remaining_epsilon)
    view = _read_view(spec, rt, where, run_id)
    n_noisy = float(gaussian_noise([float(len(view.y_train))], sigma_eval)[0])
    if n_noisy < 2 * spec.batch_size and n_noisy < 100:  # decided on the noisy count
        raise TrainingRefused("too_small", "too few learners at this node for DP training")
    steps_epoch = max(1, round(max(n_noisy, spec.batch_size) / spec.batch_size))
    sigma_final = sigma_eval / math.sqrt(spec.rounds)
    sigma = spec.noise_multiplier or calibrate(
        prior.plus(count), cap, available, spec.delta, 1.0 / steps_epoch,
        steps_epoch * spec.epochs, spec.rounds, sigma_eval, sigma_final,
        charged=RdpTotals().plus(count))
    if sigma is None:
        raise TrainingRefused("budget_exhausted", f"node {rt.node_id}: the budget left "
                              f"(ε={available:.4g}) cannot pay for {spec.rounds} rounds")
    plan = {"job": spec.job, "epsilon_available": float(available), "sigma_eval": sigma_eval,
            "sigma_final": sigma_final, "sigma_count": sigma_eval, "sigma": float(sigma),
            "steps_epoch": int(steps_epoch)}
    return releases.keep_plan(run_id, plan), view, outcome


def _train(spec: TrainSpec, rt: NodeRuntime, where: dict[str, str], run_id: str,
           plan: dict[str, Any], view: View | None, model: Any, train: bool, rnd: int
           ) -> tuple[dict, dict[str, np.ndarray]]:
    """After the round's charge: evaluate the incoming global model on held-out learners
    and, if ``train``, run one round of DP-SGD from it. Returns (metrics, weights)."""
    import torch

    started = time.perf_counter()
    TIMES["started"] = time.time()
    # A forked child inherits its parent's RNG state: re-seed from the OS, or every task
    # would draw the same DP noise.
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    torch.set_num_threads(1)
    if view is None:
        view = _read_view(spec, rt, where, run_id)
    n = len(view.y_train)
    sigma_eval = float(plan["sigma_eval"] if train else plan["sigma_final"])
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
    arrays: dict[str, np.ndarray] = {}
    TIMES["evaluated"] = time.time()
    if train:
        _failpoint("train", rnd, spec.project)
        sigma, steps_epoch = float(plan["sigma"]), int(plan["steps_epoch"])
        ran, arrays = _dp_sgd(spec, model, view, sigma, steps_epoch)
        # What ran must be within what was charged (σ, at most the planned steps), or
        # nothing leaves: the charge stands, the round fails.
        if sum(h[2] for h in ran) > steps_epoch * spec.epochs or any(
                not math.isclose(h[0], sigma) for h in ran):
            raise RuntimeError(f"DP-SGD ran {ran}, beyond its charge ({sigma}, "
                               f"{steps_epoch * spec.epochs} steps)")
    TIMES["trained"] = time.time()
    metrics = {"hist": [float(v) for v in noisy[:2 * spec.bins]],
               "train_s": round(time.perf_counter() - started, 4)}
    if train:
        metrics["n_train_noisy"] = float(noisy[-1])
    return metrics, arrays


def _dp_sgd(spec: TrainSpec, model: Any, view: View, sigma: float, steps_epoch: int
            ) -> tuple[list[tuple[float, float, int]], dict[str, np.ndarray]]:
    """One round of DP-SGD (Opacus: Poisson sampling at q = 1/steps_epoch, per-sample
    clipping, Gaussian noise): at most ``steps_epoch × epochs`` steps, what was charged."""
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
