"""The cell key method for the ``restricted`` tier (ABS TableBuilder, ONS Census 2021).

Every record (privacy unit) carries a secret, permanent 32-bit record key, derived at its
node from the node's secret and the unit (never shown). A cell's key is the sum of the
record keys of the units that contribute to it, modulo 2³²; so the same set of units gives
the same key however the query is written, and sets that differ by one unit get unrelated
keys. From the key:

- **Counts** (every unit contributes 0 or 1) follow ONS's method (the PyPI package
  ``cell-key-perturbation``): the 8-bit cell key ``ckey = key mod 256`` and the
  perturbation cell value ``pcv`` (the count, or ``(count − 1) mod 250 + 501`` above 750)
  index a perturbation table (*ptable*) of integer perturbations. A count to which units
  contribute several rows (``COUNT(*)`` over a table with many rows per unit) is perturbed
  by the same draw times its largest contribution, so one unit's rows are hidden as well
  as one row is.
- **Magnitudes** (SUM of values, and so AVG and VAR built from perturbed parts) get
  ``μ · y₁ · v`` where ``y₁`` is the largest absolute contribution of one unit and ``v`` a
  draw of a symmetric law with ``|v| ∈ [0.5, 1.5]`` (variance 13/12) keyed on the cell key
  *and the record key of that largest contributor*. Scaling by ``y₁`` means an offset
  added to every row makes the noise larger, never the target visible; ``|v| ≥ 0.5``
  gives the p% protection of the dominant unit by construction (p = μ/2), so no
  suppression rule — which would itself be a data-dependent yes/no answer — is needed.
- **Threshold**: a value is released only when the perturbed number of units behind it is
  at least ``k``; below, 0 and small are the same "< k".

A ptable is an int8 array of shape (750, 256): row ``pcv − 1``, column ``ckey``. Bulle's
default is generated here (maximum entropy on ``[−D, D]`` with mean 0 and a declared
variance, no count pushed below 0); an agency's own table in ONS's CSV layout
(``pcv,ckey,pvalue``) loads with :func:`load_ptable`.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PCV_MAX = 750  # ONS: rows 501–750 are reused for counts above 750
CKEYS = 256
MAGNITUDE_LOW, MAGNITUDE_HIGH = 0.5, 1.5
MAGNITUDE_VARIANCE = (MAGNITUDE_HIGH**3 - MAGNITUDE_LOW**3) / (3 * (MAGNITUDE_HIGH - MAGNITUDE_LOW))


class PtableError(ValueError):
    """A perturbation table that cannot be used (the message names the problem)."""


@dataclass(frozen=True)
class CkmParams:
    """Per-dataset parameters, declared in the node config (defaults are safe)."""

    threshold: int = 10  # k: fewer perturbed units than this and the value is "< k"
    max_perturbation: int = 4  # D: counts move by at most ±D (times the largest contribution)
    variance: float = 3.0  # V: variance of a count's perturbation
    # μ: a magnitude's noise is μ·B·v, |v| ∈ [0.5, 1.5], B the most one unit can add (static)
    magnitude: float = 0.5
    ptable: Path | None = None  # an ONS-layout CSV instead of the generated table


def pcv(count: np.ndarray) -> np.ndarray:
    """ONS's perturbation cell value: the count, wrapped into 501–750 above 750."""
    count = np.asarray(count, dtype=np.int64)
    return np.where(count <= PCV_MAX, count, (count - 1) % 250 + 501)


@functools.lru_cache(maxsize=16)
def generate_ptable(max_perturbation: int = 4, variance: float = 3.0) -> np.ndarray:
    """A ptable with, for every count n, perturbations on [−min(D, n), D] with mean 0 and
    the given variance (maximum entropy: p(x) ∝ exp(a·x + b·x²)), quantised to 256 keys.
    A small count whose support cannot hold that variance with mean 0 (n·D < V) gets the
    largest it can hold, n·D: rows stay unbiased."""
    d = int(max_perturbation)
    if not 1 <= d <= 50:
        raise PtableError("max_perturbation must be between 1 and 50")
    if not 0 < variance <= d * d:
        raise PtableError(f"variance must be in (0, {d * d}] for max_perturbation {d}")
    table = np.zeros((PCV_MAX, CKEYS), dtype=np.int16)
    cache: dict[int, np.ndarray] = {}
    for n in range(1, PCV_MAX + 1):
        low = -min(d, n)
        if low not in cache:
            cache[low] = _quantised_row(low, d, variance)
        table[n - 1] = cache[low]
    return table


def _maxent(support: np.ndarray, variance: float) -> np.ndarray:
    """p(x) ∝ exp(a·x + b·x²) on ``support`` with mean 0 and this variance.

    Newton's method on the convex dual log Z(θ) − θ·(0, V): its gradient is
    (E[x], E[x²] − V), its Hessian the covariance of (x, x²); each step is halved until the
    gradient shrinks (it does for a small enough step), down to float precision. A few
    lines of numpy instead of scipy's least squares: a node generates its table at start and
    must not need scipy (issue 15).
    """
    feats = np.stack([support, support**2])
    target = np.array([0.0, variance])

    def probs(theta: np.ndarray) -> np.ndarray:
        z = theta @ feats
        w = np.exp(z - z.max())
        return w / w.sum()

    def gradient(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        p = probs(theta)
        g = feats @ p - target
        return p, g, float(np.abs(g).max())

    theta = np.zeros(2)
    p, grad, norm = gradient(theta)
    for _ in range(200):
        if norm == 0.0:
            break
        centred = feats - (feats @ p)[:, None]
        step = np.linalg.solve((centred * p) @ centred.T, grad)
        t = 1.0
        while t > 1e-9:
            new = gradient(theta - t * step)
            if new[2] < norm:
                break
            t /= 2
        else:
            break  # no step makes it smaller: solved to float precision
        theta = theta - t * step
        p, grad, norm = new
    return p


def _quantised_row(low: int, high: int, variance: float) -> np.ndarray:
    """256 perturbations, sorted, whose empirical law has mean exactly 0 and a variance
    within 1/256 of the target: largest-remainder rounding of 256·p, then single-key moves.

    A law with mean 0 on [low, high] has a variance of at most −low·high (all of it on the
    two ends): a small count's row aims at that when the declared variance is larger,
    rather than giving up the mean."""
    support = np.arange(low, high + 1)
    target = min(float(variance), float(-low * high))
    if target >= -low * high:  # the two-point law, the only one with that variance
        p = np.zeros(len(support))
        p[0], p[-1] = high / (high - low), -low / (high - low)
    else:
        p = _maxent(support.astype(float), target)
    counts = np.floor(p * CKEYS).astype(int)
    # Largest remainders first; remainders equal up to float noise (a symmetric support
    # gives exact ties) go to the highest value first (what scipy's solver happened to
    # give), so the table depends on the law, not on the solver's last bits.
    remainders = np.round(p * CKEYS - counts, 9)[::-1]
    for j in np.argsort(-remainders, kind="stable")[: CKEYS - counts.sum()]:
        i = len(support) - 1 - j
        counts[i] += 1
    # Unbiased exactly: move single keys one step toward 0 until the sum of draws is 0
    # (each move changes it by 1; it starts at most 256·(high − low) away).
    for _ in range(CKEYS * (high - low)):
        total = int(counts @ support)
        if total == 0:
            break
        step = 1 if total > 0 else -1  # too high: move a key from x to x − 1
        # the key to move: the one furthest out on the heavy side that can move inward
        side = [i for i in range(len(support)) if counts[i] > 0 and support[i] * step > 0]
        if not side:
            break
        i = max(side, key=lambda j: abs(support[j]))
        counts[i] -= 1
        counts[i - step] += 1
    # Variance: moving two keys at x apart to x − 1 and x + 1 (or two keys at x − 1 and
    # x + 1 together to x) keeps the mean and changes 256·E[x²] by exactly +2 (−2). Make
    # such moves where the rounding left the most (fewest) keys until the variance is
    # within 1/256 of the target.
    goal = target * CKEYS
    squares = support**2
    for _ in range(CKEYS * (high - low) ** 2):
        gap = float(counts @ squares) - goal
        if abs(gap) <= 1:
            break
        excess = counts - CKEYS * p
        if gap < 0:  # spread two keys at x (an inner point holding two)
            score = np.where(counts[1:-1] >= 2, excess[1:-1], -np.inf)
        else:  # gather the keys at x − 1 and x + 1
            score = np.where((counts[:-2] > 0) & (counts[2:] > 0), -excess[1:-1], -np.inf)
        if score.size == 0 or not np.isfinite(score.max()):
            break
        i = int(np.argmax(score)) + 1
        sign = 1 if gap < 0 else -1
        # far from the goal, several pairs at once (a quarter of the way), then one by one
        room = counts[i] // 2 if sign > 0 else min(counts[i - 1], counts[i + 1])
        k = max(1, min(int(room), int(abs(gap)) // 8))
        counts[i] -= 2 * k * sign
        counts[i - 1] += k * sign
        counts[i + 1] += k * sign
    return np.repeat(support, counts).astype(np.int16)


def load_ptable(path: Path) -> np.ndarray:
    """A ptable in ONS's CSV layout (``pcv,ckey,pvalue``; pcv 1–750, ckey 0–255)."""
    table = np.zeros((PCV_MAX, CKEYS), dtype=np.int16)
    seen = np.zeros((PCV_MAX, CKEYS), dtype=bool)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                n, key, value = int(row["pcv"]), int(row["ckey"]), int(row["pvalue"])
                if not (1 <= n <= PCV_MAX and 0 <= key < CKEYS) or n + value < 0:
                    raise PtableError(f"{path}: row pcv={n} ckey={key} pvalue={value} is "
                                      "out of range")
                table[n - 1, key], seen[n - 1, key] = value, True
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, PtableError):
            raise
        raise PtableError(f"{path}: not a ptable in the pcv,ckey,pvalue layout ({e})") from None
    if not seen.all():
        raise PtableError(f"{path}: every pcv 1–{PCV_MAX} needs all {CKEYS} cell keys")
    return table


@functools.lru_cache(maxsize=32)
def ptable_for(params: CkmParams) -> np.ndarray:
    return (load_ptable(params.ptable) if params.ptable is not None
            else generate_ptable(params.max_perturbation, params.variance))


def describe_ptable(table: np.ndarray) -> dict[str, float]:
    """Public figures of a table (for the catalogue and the docs): largest |perturbation|,
    and the mean and variance of the perturbation of counts at and above 2·D."""
    steady = table[min(PCV_MAX - 1, 2 * int(np.abs(table).max()) + 1):]
    return {"max_perturbation": float(np.abs(table).max()),
            "mean": float(steady.mean()), "variance": float(steady.var())}


def count_perturbation(table: np.ndarray, count: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The ptable's perturbation for each (count, 32-bit cell key); 0 for empty cells."""
    count = np.asarray(count, dtype=np.int64)
    rows = np.clip(pcv(count), 1, PCV_MAX) - 1
    out = table[rows, np.asarray(key, dtype=np.int64) % CKEYS].astype(np.int64)
    return np.where(count > 0, out, 0)


def magnitude_draw(key: np.ndarray, value_key: np.ndarray) -> np.ndarray:
    """``v`` for each cell: symmetric, |v| uniform on [0.5, 1.5], from (cell key, value key:
    what each contributing unit adds, keyed by its record key) through a 64-bit mixer
    (splitmix64's finaliser)."""
    x = (np.asarray(key, dtype=np.uint64) << np.uint64(32)) ^ np.asarray(value_key, np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    sign = np.where((x & np.uint64(1)) == 1, 1.0, -1.0)
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return sign * (MAGNITUDE_LOW + (MAGNITUDE_HIGH - MAGNITUDE_LOW) * u)


def magnitude_sd(params: CkmParams, scale: float) -> float:
    """Standard deviation of a magnitude's perturbation when one unit adds at most ``scale``."""
    return params.magnitude * abs(scale) * math.sqrt(MAGNITUDE_VARIANCE)
