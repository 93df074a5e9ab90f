"""DP-SGD training at the node: what the vetted ClientApp does for one round.

The node trusts nothing it receives: the run spec is parsed and checked against this
node's own catalogue (model allowed by the operator, table and columns published here,
joins only with open tables), the board-signed grant is verified (``PrivacyGuard.admit``),
and every round is charged to this node's ledger *before* anything leaves:

1. build the training view on the locked DuckDB: one row (tabular models) or one sequence
   (GRU) per privacy unit, so one learner is one example (bounded contribution);
2. plan the noise once per run: σ of DP-SGD calibrated so the whole run fits within
   min(what the researcher asked, what the grant leaves at this node), given this node's
   ledger history for the project and dataset; evaluation counts get their own σ;
3. train with Opacus (Poisson sampling, per-sample clipping, Gaussian noise), evaluate on
   held-out learners and noise the evaluation histogram (plus the training-set size);
4. charge ``opacus_event(history)`` + the evaluation's Gaussian event with request id
   ``<run>:<round>:<node>``; refused → an error reply, nothing released;
5. keep the release (a replayed round gets the same weights back, never new noise) and
   write the audit entry; return weights (``_module.`` stripped) and DP metrics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np

from bulle_flower.models import (
    MODELS,
    SEQUENCE_MODELS,
    build_model,
    pack,
    strip_opacus_prefix,
    unpack,
)
from federation.proto import bulle_pb2 as pb
from nodes._compile import PlanRefused
from nodes._config import NodeConfig
from nodes._guard import PrivacyGuard
from privacy import RdpTotals, event_from_dict, gaussian_event, gaussian_noise, opacus_event

LIMITS = {"rounds": 200, "epochs": 20, "batch_size": 4096, "hidden": 256, "max_len": 64,
          "features": 256, "bins": 50}
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_OPS = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less,
        "=": np.equal, "!=": np.not_equal}
SIGMA_RANGE = (0.5, 200.0)


class TrainingRefused(Exception):
    """The node will not train (or release) this round; the message is safe to send."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# ------------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # "num" (scaled to [0, 1] within lo..hi) or "cat" (one-hot over values)
    lo: float = 0.0
    hi: float = 1.0
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainSpec:
    job: str
    project: str
    researcher: str
    grant: str
    model: str
    hidden: int
    table: str
    joins: tuple[tuple[str, str], ...]  # (open table, join column)
    features: tuple[Feature, ...]
    label: tuple[str, str, float]  # (column, operator, threshold)
    order_by: str
    max_len: int
    rounds: int
    epochs: int
    batch_size: int
    lr: float
    max_grad_norm: float
    epsilon: float
    delta: float
    noise_multiplier: float | None
    eval_fraction: float
    eval_share: float
    bins: int

    @property
    def n_features(self) -> int:
        """Width of one encoded row."""
        return sum(len(f.values) if f.kind == "cat" else 1 for f in self.features)

    @property
    def input_width(self) -> int:
        """Width of the model's input (``bulle_flower.models.input_width``)."""
        ordered = self.order_by and self.model not in SEQUENCE_MODELS
        return 2 * self.n_features if ordered else self.n_features

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> TrainSpec:
        """Validate a spec received from the coordinator (limits, names, types)."""
        try:
            def name(v: Any) -> str:
                if not isinstance(v, str) or not _NAME.match(v):
                    raise ValueError(f"invalid name {str(v)[:40]!r}")
                return v

            def bounded(key: str, lo: float, hi: float) -> float:
                v = float(raw[key])
                if not (lo <= v <= hi) or math.isnan(v):
                    raise ValueError(f"{key} must be in [{lo}, {hi}]")
                return v

            feats = []
            for f in raw["features"]:
                if f["kind"] == "num":
                    lo, hi = float(f["lo"]), float(f["hi"])
                    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                        raise ValueError(f"feature {f['name']!r}: bounds must be lo < hi")
                    feats.append(Feature(name(f["name"]), "num", lo, hi))
                elif f["kind"] == "cat":
                    values = tuple(str(v)[:200] for v in f["values"])
                    if not values or len(values) > LIMITS["features"]:
                        raise ValueError(f"feature {f['name']!r}: bad category list")
                    feats.append(Feature(name(f["name"]), "cat", values=values))
                else:
                    raise ValueError("feature kind must be num or cat")
            col, op, value = raw["label"]
            if op not in _OPS:
                raise ValueError(f"label operator must be one of {', '.join(_OPS)}")
            nm = raw.get("noise_multiplier")
            spec = cls(
                job=str(raw["job"])[:64], project=str(raw["project"]),
                researcher=str(raw["researcher"]), grant=str(raw["grant"]),
                model=str(raw["model"]), hidden=int(bounded("hidden", 1, LIMITS["hidden"])),
                table=name(raw["table"]),
                joins=tuple((name(t), name(c)) for t, c in raw.get("joins", [])),
                features=tuple(feats), label=(name(col), op, float(value)),
                order_by=name(raw["order_by"]) if raw.get("order_by") else "",
                max_len=int(bounded("max_len", 2, LIMITS["max_len"])),
                rounds=int(bounded("rounds", 1, LIMITS["rounds"])),
                epochs=int(bounded("epochs", 1, LIMITS["epochs"])),
                batch_size=int(bounded("batch_size", 1, LIMITS["batch_size"])),
                lr=bounded("lr", 1e-6, 10.0), max_grad_norm=bounded("max_grad_norm", 1e-3, 100),
                epsilon=bounded("epsilon", 1e-3, 100.0), delta=bounded("delta", 1e-12, 0.1),
                noise_multiplier=None if nm is None else float(nm),
                eval_fraction=bounded("eval_fraction", 0.0, 0.5),
                eval_share=bounded("eval_share", 0.01, 0.5),
                bins=int(bounded("bins", 2, LIMITS["bins"])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TrainingRefused("bad_spec", f"invalid training spec ({e})") from None
        if spec.model not in MODELS:
            raise TrainingRefused("bad_spec", f"model {spec.model!r} is not in the zoo")
        if spec.bins % 2:
            raise TrainingRefused("bad_spec", "bins must be even (threshold 0.5 on a bin edge)")
        if spec.noise_multiplier is not None and not SIGMA_RANGE[0] <= spec.noise_multiplier:
            raise TrainingRefused("bad_spec", f"noise_multiplier must be >= {SIGMA_RANGE[0]}")
        if spec.n_features == 0 or spec.n_features > LIMITS["features"]:
            raise TrainingRefused("bad_spec", "between 1 and 256 feature columns")
        if spec.model in SEQUENCE_MODELS and not spec.order_by:
            raise TrainingRefused("bad_spec", "a sequence model needs order_by")
        if not spec.order_by and spec.label[0] in {f.name for f in spec.features}:
            # with an order, only the learner's earlier values of it are features
            raise TrainingRefused("bad_spec", "the label column cannot also be a feature of "
                                  "the same row (give order_by to use its earlier values)")
        return spec


# ------------------------------------------------------------------------ the node side


@dataclass
class NodeRuntime:
    """What the executor process holds for its forked tasks (bound before any fork)."""

    config: NodeConfig
    engine: Any  # nodes._engine.NodeEngine (locked DuckDB + catalogue meta)
    models: tuple[str, ...]
    state_dir: Path

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


@dataclass
class View:
    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def check_spec(spec: TrainSpec, meta: dict[str, Any], models: tuple[str, ...]) -> dict[str, str]:
    """Check the spec against this node's catalogue; returns column → table alias."""
    if spec.model not in models:
        raise TrainingRefused("not_allowed", f"this node does not train {spec.model!r}")
    t = meta.get(spec.table)
    if t is None:
        raise TrainingRefused("not_allowed", f"table {spec.table!r} is not published here")
    if t.tier == "open" or not t.privacy_unit:
        raise TrainingRefused("not_allowed", "DP training runs on sensitive or restricted "
                              "tables with a privacy unit")
    where: dict[str, str] = {c: "t" for c in t.columns}
    for i, (jt, col) in enumerate(spec.joins):
        j = meta.get(jt)
        if j is None or j.tier != "open":
            raise TrainingRefused("not_allowed", f"joins are only with open tables ({jt!r})")
        if col not in t.columns or col not in j.columns:
            raise TrainingRefused("not_allowed", f"join column {col!r} is not in both tables")
        for c in j.columns:
            where.setdefault(c, f"j{i}")
    used = [f.name for f in spec.features] + [spec.label[0]] + \
        ([spec.order_by] if spec.order_by else [])
    for c in used:
        if c not in where:
            raise TrainingRefused("not_allowed", f"column {c!r} is not in the training view")
        if c == t.privacy_unit:
            raise TrainingRefused("not_allowed", "the privacy unit cannot be a feature or label")
    return where


def _quote(name: str) -> str:
    return '"' + name + '"'


def fetch_rows(cursor: Any, spec: TrainSpec, unit: str, where: dict[str, str]) -> dict[str, Any]:
    """The raw columns of the view, one row per source row (names come from the catalogue)."""
    cols = dict.fromkeys([f.name for f in spec.features] + [spec.label[0]]
                         + ([spec.order_by] if spec.order_by else []))
    select = [f"t.{_quote(unit)} AS __unit"] + [f"{where[c]}.{_quote(c)} AS {_quote(c)}"
                                                for c in cols]
    sql = f"SELECT {', '.join(select)} FROM {_quote(spec.table)} AS t"
    for i, (jt, col) in enumerate(spec.joins):
        sql += f" JOIN {_quote(jt)} AS j{i} ON t.{_quote(col)} = j{i}.{_quote(col)}"
    table = cursor.sql(sql).to_arrow_table()
    return {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in table.column_names}


def _floats(v: np.ndarray) -> np.ndarray:
    """A column as float64, NULL → NaN (vectorised: columns are tens of thousands long)."""
    if v.dtype.kind in "iuf":
        return v.astype(np.float64)
    import pandas as pd

    return pd.to_numeric(pd.Series(v, dtype=object), errors="coerce").to_numpy(np.float64)


def encode(rows: dict[str, Any], features: tuple[Feature, ...]) -> np.ndarray:
    """Feature matrix: numbers clamped and scaled to [0, 1] (NULL → 0), categories one-hot."""
    import pandas as pd

    blocks = []
    for f in features:
        v = rows[f.name]
        if f.kind == "num":
            x = np.clip((_floats(v) - f.lo) / (f.hi - f.lo), 0.0, 1.0)
            blocks.append(np.nan_to_num(x, nan=0.0)[:, None])
        else:
            s = pd.Series(v, dtype=object)
            s = s.where(s.notna(), "").astype(str).to_numpy()
            blocks.append(np.stack([(s == c) for c in f.values], axis=1).astype(np.float64))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def label_of(rows: dict[str, Any], label: tuple[str, str, float]) -> np.ndarray:
    col, op, value = label
    raw = _floats(rows[col])
    out = _OPS[op](raw, value).astype(np.float32)
    out[np.isnan(raw)] = np.nan  # no label: the row cannot be used
    return out


def eval_mask(units: np.ndarray, salt: bytes, fraction: float) -> np.ndarray:
    """A stable held-out set of units (keyed hash, so it does not move between runs)."""
    if fraction <= 0:
        return np.zeros(len(units), dtype=bool)
    cut = int(fraction * 2**32)
    return np.array([int.from_bytes(hashlib.sha256(salt + str(u).encode()).digest()[:4], "big")
                     < cut for u in units])


def build_view(rows: dict[str, Any], spec: TrainSpec, salt: bytes,
               rng: np.random.Generator) -> View:
    """One example per unit. With ``order_by``: the unit's rows in order, the label of
    its last row to predict from the (at most ``max_len``) rows before — as a sequence
    (GRU), or as their mean next to the last row without its label columns (tabular).
    Without: one random row of the unit (tabular)."""
    x_all = encode(rows, spec.features)
    y_all = label_of(rows, spec.label)
    units = rows["__unit"]
    keep = ~np.isnan(y_all) & ~np.array([u is None for u in units])
    x_all, y_all, units = x_all[keep], y_all[keep], units[keep]
    if spec.order_by:
        order = _floats(rows[spec.order_by])[keep]
        idx = np.lexsort((np.nan_to_num(order, nan=np.inf), units))
        x_all, y_all, units = x_all[idx], y_all[idx], units[idx]
        starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
        ends = np.r_[starts[1:], len(units)]
        ok = ends - starts >= 2  # a trace and a next step to predict
        starts, ends = starts[ok], ends[ok]
        last = ends - 1  # the row to predict; before it, at most max_len rows
        first = np.maximum(starts, last - spec.max_len)
        if spec.model in SEQUENCE_MODELS:
            pos = last[:, None] - spec.max_len + np.arange(spec.max_len)[None, :]
            real = pos >= first[:, None]  # left-padded: the GRU ends on real data
            x = np.where(real[..., None], x_all[np.maximum(pos, 0)], 0.0).astype(np.float32)
        else:
            cum = np.vstack([np.zeros((1, x_all.shape[1])), np.cumsum(x_all, axis=0,
                                                                       dtype=np.float64)])
            mean = (cum[last] - cum[first]) / (last - first)[:, None]
            current = x_all[last].copy()
            current[:, _columns_of(spec, spec.label[0])] = 0.0  # the label's own value
            x = np.concatenate([mean, current], axis=1).astype(np.float32)
        y = y_all[last]
        unit_ids = units[starts]
    else:
        perm = rng.permutation(len(units))
        _, first_seen = np.unique(units[perm], return_index=True)
        pick = perm[first_seen]
        x, y, unit_ids = x_all[pick], y_all[pick], units[pick]
    held = eval_mask(unit_ids, salt, spec.eval_fraction)
    return View(x[~held], y[~held], x[held], y[held])


def _columns_of(spec: TrainSpec, name: str) -> np.ndarray:
    """Positions, in an encoded row, of the feature(s) named ``name``."""
    out, at = [], 0
    for f in spec.features:
        width = len(f.values) if f.kind == "cat" else 1
        if f.name == name:
            out.extend(range(at, at + width))
        at += width
    return np.array(out, dtype=int)


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
              steps: int, rounds: int, sigma_eval: float) -> float | None:
    """Smallest σ (within ``SIGMA_RANGE``) such that the run of ``rounds`` rounds costs at
    most ``target`` ε on its own and ``prior`` plus the run stays within ``cap`` (both at
    δ); None if even the largest σ does not fit. (RDP composition is sublinear: the run's
    own ε is larger than what it adds to a prior spend, so both are checked.)"""
    def fits(sigma: float) -> bool:
        run = dpa.ComposedDpEvent([  # the rounds, then the final model's evaluation
            dpa.SelfComposedDpEvent(round_event(sigma, sample_rate, steps, sigma_eval), rounds),
            gaussian_event(sigma_eval)])
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
    rnd, run_id = int(cfg["round"]), str(cfg["run_id"])
    request_id = f"{run_id}:{rnd}:{rt.node_id}"
    guard = PrivacyGuard(rt.node_id, rt.state_dir, rt.config.board_public_key)
    spec: TrainSpec | None = None

    def audit(action: str, **detail: Any) -> None:
        who = spec.researcher[:128] if spec else "?"
        guard.audit.append(who, spec.project[:128] if spec else "?", action, {
            "node": rt.node_id, "request_id": request_id, "round": rnd,
            "job": spec.job if spec else "", "table": spec.table if spec else "", **detail})

    try:
        spec = TrainSpec.parse(json.loads(str(cfg["spec"])))
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
        train = bool(int(cfg.get("train", 1)))  # 0: the final model's evaluation only
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
    sigma_eval = float(plan["sigma_eval"])

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
    run_eps = RdpTotals()
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
    prior = RdpTotals()
    for h in history:
        if h.accepted:
            prior.add(event_from_dict(h.event))
    state = context.state
    plan = dict(state["bulle"]) if "bulle" in state else {}
    if plan.get("job") == spec.job:
        return plan, prior
    spent = prior.epsilon(spec.delta) if history else 0.0
    available = min(spec.epsilon, cap - spent)
    if available <= 0:
        raise TrainingRefused("budget_exhausted", f"node {rt.node_id}: no budget left for "
                              f"project {spec.project!r} on {spec.table!r}")
    plan = {"job": spec.job, "epsilon_available": float(available),
            "sigma_eval": sigma_for_eval(spec.rounds + 1, spec.eval_share * available,
                                         spec.delta)}
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
        steps_epoch * spec.epochs, spec.rounds, float(plan["sigma_eval"]))
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
