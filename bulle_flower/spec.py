"""The training spec: one frozen type shared by the coordinator, the ServerApp and the nodes.

The coordinator builds a ``TrainSpec`` from a researcher's request (its feature layout from
public domains and declared bounds only), signs the hash of ``to_dict()`` (canonical JSON,
``privacy.spec_json``) in the run's authorisation and submits it as the ServerApp's run
config; the ServerApp and every node rebuild it with ``from_dict``. A spec is checked when
it is built, in one place (``__post_init__``): names, operators, limits, and what must hold
between fields. A spec that does not hold raises ``SpecError`` (its message quotes no data:
it is safe to show); each party maps it to its own error (the coordinator: ``bad_request``,
a node: a ``bad_spec`` refusal).

The label is binary: ``(column, op, number)`` with op one of ``>= > <= < = !=``, or
``(column, "in" | "not in", (value, …))`` on a column with a public domain.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

MODELS = ("logreg", "mlp", "gru")  # the zoo (``bulle_flower.models`` builds them)
SEQUENCE_MODELS = ("gru",)
LIMITS = {"rounds": 200, "epochs": 20, "batch_size": 4096, "hidden": 256, "max_len": 64,
          "features": 256, "bins": 50}
# field -> (lowest, highest): every number of a spec is within its range
RANGES: dict[str, tuple[float, float]] = {
    "hidden": (1, LIMITS["hidden"]), "max_len": (2, LIMITS["max_len"]),
    "rounds": (1, LIMITS["rounds"]), "epochs": (1, LIMITS["epochs"]),
    "batch_size": (1, LIMITS["batch_size"]), "lr": (1e-6, 10.0),
    "max_grad_norm": (1e-3, 100.0), "epsilon": (1e-3, 100.0), "delta": (1e-12, 0.1),
    "eval_fraction": (0.0, 0.5), "eval_share": (0.01, 0.5), "bins": (2, LIMITS["bins"]),
    "min_nodes": (1, 1000), "round_timeout_s": (1.0, 86_400.0),
}
INTS = ("hidden", "max_len", "rounds", "epochs", "batch_size", "bins", "min_nodes", "seed")
FLOATS = ("lr", "max_grad_norm", "epsilon", "delta", "eval_fraction", "eval_share",
          "round_timeout_s")
NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
LABEL_OPS = (">=", ">", "<=", "<", "=", "!=")
SET_OPS = ("in", "not in")  # a categorical label: the column's value in a set of values
# The smallest DP-SGD noise multiplier a run may ask for (= privacy.SIGMA_RANGE[0], the
# lower end of the nodes' search; a test checks they agree)
NOISE_MULTIPLIER_MIN = 0.5
MAX_TEXT = 200  # a category or label value longer than this is cut


def n_features(features: list[dict[str, Any]]) -> int:
    """Width of the feature vector a layout produces (numbers: 1, categories: one-hot)."""
    return sum(len(f["values"]) if f["kind"] == "cat" else 1 for f in features)


def input_width(model: str, features: list[dict[str, Any]], order_by: str) -> int:
    """Input width of the model: a tabular model over ordered traces sees the mean of the
    learner's earlier rows next to the row to predict (twice the layout's width)."""
    width = n_features(features)
    return 2 * width if order_by and model not in SEQUENCE_MODELS else width


class SpecError(ValueError):
    """The spec is not a valid one (the message names fields, never data)."""


def _name(value: Any, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise SpecError(f"invalid {what} {str(value)[:40]!r}")
    return value


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # "num" (scaled to [0, 1] within lo..hi) or "cat" (one-hot over values)
    lo: float = 0.0
    hi: float = 1.0
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _name(self.name, "feature name")
        if self.kind == "num":
            if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
                raise SpecError(f"feature {self.name!r}: bounds must be lo < hi")
        elif self.kind == "cat":
            if not self.values or len(self.values) > LIMITS["features"] \
                    or not all(isinstance(v, str) for v in self.values):
                raise SpecError(f"feature {self.name!r}: bad category list")
        else:
            raise SpecError("feature kind must be num or cat")

    @property
    def width(self) -> int:
        """Columns of this feature in an encoded row."""
        return len(self.values) if self.kind == "cat" else 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Feature:
        if raw["kind"] == "num":
            return cls(raw["name"], "num", float(raw["lo"]), float(raw["hi"]))
        if raw["kind"] == "cat":
            return cls(raw["name"], "cat",
                       values=tuple(str(v)[:MAX_TEXT] for v in raw["values"]))
        raise SpecError("feature kind must be num or cat")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "num":
            return {"name": self.name, "kind": "num", "lo": self.lo, "hi": self.hi}
        return {"name": self.name, "kind": "cat", "values": list(self.values)}


@dataclass(frozen=True)
class TrainSpec:
    """What a training run is: the model, the view, DP-SGD's parameters and the budget.

    The nodes use all but the last five fields; ``nodes``, ``min_nodes``,
    ``round_timeout_s`` and ``seed`` drive the ServerApp; ``epsilon_total`` is the run's
    composed target (``epsilon`` is each node's). All are in the signed hash."""

    job: str  # the run id (the coordinator's job id; signed in the run's authorisation)
    project: str
    researcher: str
    grant: str  # the board-signed grant token
    model: str
    hidden: int
    table: str
    joins: tuple[tuple[str, str], ...]  # (open table, join column)
    features: tuple[Feature, ...]
    label: tuple[str, str, Any]  # (column, operator, number) or (column, "in", (values…))
    order_by: str
    max_len: int
    rounds: int
    epochs: int
    batch_size: int
    lr: float
    max_grad_norm: float
    epsilon: float  # each node's target
    delta: float
    noise_multiplier: float | None
    eval_fraction: float
    eval_share: float
    bins: int
    nodes: tuple[str, ...] = ()
    min_nodes: int = 1
    round_timeout_s: float = 120.0
    seed: int = 0
    epsilon_total: float | None = None

    def __post_init__(self) -> None:
        for key, (lo, hi) in RANGES.items():
            if not lo <= getattr(self, key) <= hi:  # NaN too
                raise SpecError(f"invalid training spec ({key} must be in [{lo:g}, {hi:g}])")
        if not all(isinstance(getattr(self, k), int) for k in INTS):
            raise SpecError("invalid training spec (counts must be integers)")
        _name(self.table, "table name")
        for t, c in self.joins:
            _name(t, "table name")
            _name(c, "column name")
        if self.order_by:
            _name(self.order_by, "column name")
        if not all(isinstance(n, str) and 0 < len(n) <= 128 for n in self.nodes):
            raise SpecError("invalid training spec (node ids)")
        if self.epsilon_total is not None and not self.epsilon_total > 0:
            raise SpecError("invalid training spec (epsilon_total must be positive)")
        self._check_label()
        self._check_model()

    def _check_label(self) -> None:
        col, op, value = self.label
        _name(col, "label column")
        if op in SET_OPS:
            if not isinstance(value, tuple) or not 1 <= len(value) <= LIMITS["features"] \
                    or not all(isinstance(v, str) for v in value):
                raise SpecError("a categorical label needs 1 to 256 string values")
        elif op in LABEL_OPS:
            if not isinstance(value, float):
                raise SpecError("a label compared with an operator needs a number")
        else:
            raise SpecError(f"label operator must be one of {', '.join(LABEL_OPS + SET_OPS)}")

    def _check_model(self) -> None:
        if self.model not in MODELS:
            raise SpecError(f"model {self.model!r} is not in the zoo")
        if self.bins % 2:
            raise SpecError("bins must be even (threshold 0.5 on a bin edge)")
        nm = self.noise_multiplier
        if nm is not None and not nm >= NOISE_MULTIPLIER_MIN:
            raise SpecError(f"noise_multiplier must be >= {NOISE_MULTIPLIER_MIN}")
        if self.n_features == 0 or self.n_features > LIMITS["features"]:
            raise SpecError("between 1 and 256 feature columns")
        if self.model in SEQUENCE_MODELS and not self.order_by:
            raise SpecError("a sequence model needs order_by")
        if not self.order_by and self.label[0] in {f.name for f in self.features}:
            # with an order, only the learner's earlier values of it are features
            raise SpecError("the label column cannot also be a feature of the same row "
                            "(give order_by to use its earlier values)")

    # -- derived ------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        """Width of one encoded row."""
        return sum(f.width for f in self.features)

    @property
    def input_width(self) -> int:
        """Width of the model's input."""
        return input_width(self.model, [f.to_dict() for f in self.features], self.order_by)

    # -- the wire -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainSpec:
        """The spec of ``raw`` (what ``to_dict`` gives, as JSON carried it); ``SpecError``
        if it is not a valid one. Keys it does not know are ignored."""
        try:
            col, op, value = raw["label"]
            if op in SET_OPS and isinstance(value, list):  # strings only: others refused
                value = tuple(v[:MAX_TEXT] if isinstance(v, str) else v for v in value)
            elif op in LABEL_OPS:
                value = float(value)
            nm, total = raw.get("noise_multiplier"), raw.get("epsilon_total")
            return cls(
                job=str(raw["job"])[:64], project=str(raw["project"]),
                researcher=str(raw["researcher"]), grant=str(raw["grant"]),
                model=str(raw["model"]), table=raw["table"],
                joins=tuple((t, c) for t, c in raw.get("joins", [])),
                features=tuple(Feature.from_dict(f) for f in raw["features"]),
                label=(col, op, value), order_by=raw.get("order_by") or "",
                noise_multiplier=None if nm is None else float(nm),
                nodes=tuple(raw.get("nodes", ())),
                epsilon_total=None if total is None else float(total),
                **{k: _int(raw[k]) for k in INTS if k in raw or k not in _DEFAULTS},
                **{k: float(raw[k]) for k in FLOATS if k in raw or k not in _DEFAULTS})
        except SpecError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise SpecError(f"invalid training spec ({type(e).__name__}: {str(e)[:80]})") \
                from None

    parse = from_dict  # its name at the nodes before the spec was shared

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON carries it (lists, not tuples): ``from_dict`` gives it back."""
        col, op, value = self.label
        return {
            "job": self.job, "project": self.project, "researcher": self.researcher,
            "grant": self.grant, "model": self.model, "hidden": self.hidden,
            "table": self.table, "joins": [[t, c] for t, c in self.joins],
            "features": [f.to_dict() for f in self.features],
            "label": [col, op, list(value) if op in SET_OPS else value],
            "order_by": self.order_by, "max_len": self.max_len, "rounds": self.rounds,
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
            "max_grad_norm": self.max_grad_norm, "epsilon": self.epsilon,
            "epsilon_total": self.epsilon_total, "delta": self.delta,
            "noise_multiplier": self.noise_multiplier, "eval_fraction": self.eval_fraction,
            "eval_share": self.eval_share, "bins": self.bins, "nodes": list(self.nodes),
            "min_nodes": self.min_nodes, "round_timeout_s": self.round_timeout_s,
            "seed": self.seed,
        }


_DEFAULTS = {"min_nodes", "round_timeout_s", "seed"}  # keys a spec may leave out


def _int(value: Any) -> int:
    """A count as JSON carries it (2, or 2.0); a fraction is refused, not cut."""
    if isinstance(value, bool):
        raise TypeError("a count, not a boolean")
    number = float(value)
    if number != int(number):
        raise ValueError(f"{number!r} is not a whole number")
    return int(number)
