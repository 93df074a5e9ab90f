"""Precision first: the ε a DP query needs for a precision the researcher asks for.

``price(...)`` answers "what ε makes every released value's 95% noise interval no wider
than ±h?" from public figures only (the plan, the catalogue's declared bounds and
``max_rows_per_unit``, the number of nodes the plan goes to): no charge, no node contacted.

How the noise is made (nodes/_dp.py, privacy/_mechanisms.py): each of the ``n`` nodes the
plan is sent to splits its ε equally over the plan's ``P`` partial aggregates and adds
Laplace noise of scale ``b = Δ / (ε / P)`` to every cell of every partial, Δ being the
partial's L1 sensitivity at that node (``max_rows_per_unit`` for a count,
``max_rows_per_unit · max(|lo|, |hi|)`` for a sum of values clamped to [lo, hi],
``max_rows_per_unit · max(lo², hi²)`` for a sum of squares). Noisy counts are rounded to
whole numbers at the node. The coordinator sums the n partials, so the error of a merged
partial is

- a sum: ``L₁ + … + Lₙ``, Lᵢ ~ Laplace(bᵢ) independent. P(|ΣLᵢ| ≤ h) is computed in
  closed form for n iid Laplace variables (the n-fold convolution, Kotz, Kozubowski &
  Podgórski, *The Laplace Distribution and Generalizations*, 2001, eq. 2.3.25): **exact**
  when every node has the same scale (same bounds and ``max_rows_per_unit``, the usual
  case), and conservative otherwise, every node then being given the largest scale (a
  Laplace law is less peaked the larger its scale, and peakedness ordering of symmetric
  unimodal laws is kept by convolution: Birnbaum, *Ann. Math. Stat.* 1948);
- a count: ``round(L₁) + … + round(Lₙ)``, an integer. Its law is computed **exactly** by
  discrete convolution of each node's law of ``round(Lᵢ)`` (P(0) = 1 − e^{−1/(2b)},
  P(±k) = sinh(1/(2b))·e^{−k/b}), tails cut below 1e-13 and that mass counted as outside
  the interval. The coordinator's clamp of a count at 0 only moves it towards the truth.

The price is the smallest ε (per node, as ``hub.sql(..., epsilon=ε)`` takes it) for which
every partial of the plan has P(|error| ≤ h) ≥ 95%. A released COUNT or SUM *is* a merged
partial, so its interval is within ±h exactly as computed. AVG, VAR/STDDEV and expressions
over aggregates are ratios of partials: the precision is then guaranteed for their
numerator and denominator separately (each within ±h at 95%, both together at ≥ 90%),
not for the ratio; at a count C the error of a mean is at most (h + |mean|·h)/(C − h) when
both are. The result's notes say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from federation import _dp_rules as dp_rules
from federation._catalog import FederatedTable
from federation._errors import QueryError
from federation._planner import FederatedPlan
from federation._tree import Agg, Query, walk
from federation.proto import bulle_pb2 as pb

LEVEL = 0.95
EPSILON_MAX = 10.0  # the largest ε one query may use (the API's limit)
_TAIL = 1e-13  # mass of a count's noise law left out of the convolution (counted as outside)
_COUNTS = (pb.COUNT_ROWS, pb.COUNT)
_KIND_NAME = {pb.COUNT_ROWS: "count", pb.COUNT: "count", pb.SUM: "sum",
              pb.SUM_SQUARES: "sum of squares"}


# -- the laws of the merged noise --------------------------------------------------------

def laplace_sum_coverage(h: float, scale: float, n: int) -> float:
    """P(|L₁ + … + Lₙ| ≤ h) for n independent Laplace(0, scale) variables (closed form).

    The density of the sum of n standard Laplace variables is
    e^{−|x|} / ((n−1)! 2ⁿ) · Σ_{j<n} (n−1+j)! / ((n−1−j)! j! 2^j) |x|^{n−1−j}, so its upper
    tail at h is e^{−h} / ((n−1)! 2ⁿ) · Σ_{j<n} (n−1+j)! / (j! 2^j) · Σ_{i≤n−1−j} hⁱ/i!.
    """
    if n < 1 or scale < 0 or h < 0:
        raise ValueError("need n >= 1, scale >= 0 and h >= 0")
    if scale == 0:
        return 1.0
    x = min(h / scale, 1e4)  # beyond, the tail is 0 in floating point
    total = 0.0
    for j in range(n):
        partial = sum(x ** i / math.factorial(i) for i in range(n - j))
        total += math.factorial(n - 1 + j) / (math.factorial(j) * 2.0 ** j) * partial
    tail = math.exp(-x) * total / (math.factorial(n - 1) * 2.0 ** n)
    return max(0.0, 1.0 - 2.0 * tail)


def _rounded_laplace_pmf(scale: float) -> tuple[np.ndarray, float]:
    """P(round(L) = k) for k in −K…K, L ~ Laplace(0, scale), and the mass left out."""
    if scale == 0:
        return np.ones(1), 0.0
    k_max = max(1, math.ceil(scale * math.log(1.0 / _TAIL)))
    k = np.arange(1, k_max + 1, dtype=float)
    side = math.sinh(0.5 / scale) * np.exp(-k / scale)
    zero = -math.expm1(-0.5 / scale)
    pmf = np.concatenate([side[::-1], [zero], side])
    return pmf, max(0.0, 1.0 - float(pmf.sum()))


def _rounded_sum_pmf(scales: list[float]) -> tuple[np.ndarray, float]:
    """The law of round(L₁) + … + round(Lₙ) on −K…K (centred), and the mass left out."""
    if not scales:
        raise ValueError("need at least one scale")
    pmfs, lost = [], 0.0
    for b in scales:
        pmf, out = _rounded_laplace_pmf(b)
        pmfs.append(pmf)
        lost += out
    if len(pmfs) == 1:
        return pmfs[0], lost
    size = sum(len(p) - 1 for p in pmfs) + 1
    fft_len = 1 << (size - 1).bit_length()
    spectrum = np.ones(fft_len // 2 + 1, dtype=complex)
    for p in pmfs:
        spectrum *= np.fft.rfft(p, fft_len)
    return np.clip(np.fft.irfft(spectrum, fft_len)[:size], 0.0, None), lost


def rounded_laplace_sum_coverage(h: float, scales: list[float]) -> float:
    """P(|round(L₁) + … + round(Lₙ)| ≤ h), Lᵢ ~ Laplace(0, scales[i]) independent: exact
    up to the left-out tails (< 1e-13 per node, counted as outside ±h) and FFT rounding."""
    if h < 0:
        raise ValueError("need h >= 0")
    total, lost = _rounded_sum_pmf(scales)
    centre = (len(total) - 1) // 2
    reach = min(math.floor(h), centre)
    inside = float(total[centre - reach:centre + reach + 1].sum())
    return max(0.0, min(1.0, inside) - lost)


def noise_interval(kind: int, scales: list[float], level: float = LEVEL
                   ) -> tuple[float, float]:
    """(sd, w) of a merged partial's noise: w is the smallest half-width with
    P(|error| ≤ w) ≥ ``level`` (a whole number for counts), by the laws above (exact for
    counts; for sums exact when the nodes share a scale, else conservative)."""
    scales = [b for b in scales if b > 0]
    if not scales:
        return 0.0, 0.0
    if kind in _COUNTS:
        total, lost = _rounded_sum_pmf(scales)
        centre = (len(total) - 1) // 2
        k = np.arange(-centre, centre + 1, dtype=float)
        # mass within ±H: the centre plus both sides up to H
        within = total[centre] + np.concatenate([[0.0], np.cumsum(
            total[centre + 1:] + total[centre - 1::-1][:centre])]) - lost
        reach = int(np.searchsorted(within, level))
        return math.sqrt(float((k * k * total).sum())), float(min(reach, centre))
    sd = math.sqrt(2 * sum(b * b for b in scales))
    n, b = len(scales), max(scales)
    lo, hi = 0.0, b * math.log(1 / (1 - level))
    while laplace_sum_coverage(hi, b, n) < level:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if laplace_sum_coverage(mid, b, n) >= level else (mid, hi)
    return sd, hi


def coverage(kind: int, h: float, scales: list[float]) -> float:
    """P(|error of a merged partial| ≤ h) for the nodes' Laplace scales."""
    if kind in _COUNTS:
        return rounded_laplace_sum_coverage(h, scales)
    return laplace_sum_coverage(h, max(scales), len(scales))


def epsilon_each_for(kind: int, h: float, sensitivities: list[float],
                     level: float = LEVEL) -> float:
    """The smallest per-partial ε (ε/P at each node) with coverage(±h) ≥ ``level``.

    Coverage grows with ε (the scales are Δᵢ/ε). Bisection on log ε to a relative 1e-6,
    returning the upper end, so the answer always meets the level. A count is bracketed
    first by the continuous law (cheap at any scale), then searched with its exact law.
    """
    if not h > 0 or not math.isfinite(h) or not sensitivities:
        raise ValueError("precision must be a positive number")

    def ok(eps: float, k: int = kind) -> bool:
        return coverage(k, h, [d / eps for d in sensitivities]) >= level

    def search(lo: float, hi: float, k: int) -> float:
        while not ok(hi, k):
            lo, hi = hi, hi * 4
            if hi > 1e9:
                raise ValueError("precision not reachable")
        while ok(lo, k) and lo > 1e-12:
            lo, hi = lo / 4, lo
        while hi / lo > 1 + 1e-6:
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if ok(mid, k) else (mid, hi)
        return hi

    rough = search(1e-3, 1.0, pb.SUM)  # the continuous law: near a count's answer
    return rough if kind not in _COUNTS else search(rough / 2, rough * 2, kind)


# -- a query's price ---------------------------------------------------------------------

@dataclass(frozen=True)
class PartialPrice:
    name: str  # the released items this partial feeds
    kind: str  # count, sum, sum of squares
    sensitivity: float  # the largest Δ among the nodes
    epsilon_each: float  # what this partial alone would need


@dataclass
class Price:
    precision: float
    epsilon: float  # per node: what hub.sql(..., epsilon=) takes
    epsilon_charged: float  # what the project's ledger would be charged
    nodes: list[str]
    partials: list[PartialPrice]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "level": LEVEL, "epsilon": self.epsilon,
                "epsilon_charged": self.epsilon_charged, "nodes": self.nodes,
                "partials": [p.__dict__ for p in self.partials], "notes": self.notes}


def _feeds(fp: FederatedPlan) -> dict[str, list[str]]:
    """Partial name -> the released items (or HAVING/ORDER BY) computed from it."""
    out: dict[str, list[str]] = {}
    items = {i.expr: i.name for i in fp.query.items}
    for agg, roles in fp.roles.items():
        for name in roles.values():
            out.setdefault(name, []).append(items.get(agg, agg.func.upper()))
    return out


def _ratios(query: Query) -> list[str]:
    """Released items that are not a bare COUNT or SUM (functions of several partials)."""
    return [i.name for i in query.items
            if not (isinstance(i.expr, Agg) and i.expr.func in ("count", "sum"))
            and any(isinstance(n, Agg) for n in walk(i.expr))]


def _round_up(x: float, digits: int = 4) -> float:
    """``x`` rounded up to ``digits`` significant digits (never below ``x``)."""
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    out = math.ceil(x / step) * step
    return out if out >= x else math.nextafter(out, math.inf)


def price(fp: FederatedPlan, catalog: dict[str, FederatedTable], nodes: list[str],
          precision: float, disjoint: bool) -> Price:
    """The ε per node for ±``precision`` at 95% on every partial (module docstring)."""
    if not isinstance(precision, (int, float)) or not precision > 0 \
            or not math.isfinite(precision):
        raise QueryError("bad_request", "precision must be a positive number")
    query = fp.query
    source = catalog[query.source.table]
    rows = [source.max_rows_per_unit.get(n, 1) or 1 for n in nodes]
    bounds = dp_rules.bounds_of(query, catalog)
    feeds = _feeds(fp)
    parts = []
    for p in fp.partials:
        if p.kind in _COUNTS:
            per_row = 1.0
        else:
            lo, hi = dp_rules.value_range(p.arg, bounds)  # checked by dp_rules.check
            per_row = max(abs(lo), abs(hi)) if p.kind == pb.SUM else max(lo * lo, hi * hi)
        sens = [m * per_row for m in rows]
        try:
            each = epsilon_each_for(p.kind, precision, sens)
        except ValueError:
            each = math.inf
        parts.append(PartialPrice(", ".join(dict.fromkeys(feeds.get(p.name, [p.name]))),
                                  _KIND_NAME[p.kind], max(sens), each))
    epsilon = len(parts) * max(p.epsilon_each for p in parts)
    if epsilon > EPSILON_MAX:
        tight = max(parts, key=lambda p: p.epsilon_each)
        needed = "more than 1e9" if math.isinf(epsilon) else f"{epsilon:.4g}"
        raise QueryError("precision_unreachable", (
            f"±{precision:g} at 95% needs ε = {needed} per node, above the largest ε a "
            f"query may use ({EPSILON_MAX:g}); the {tight.kind} for {tight.name} is the "
            f"tightest (sensitivity {tight.sensitivity:g} at each of {len(nodes)} node(s)): "
            "ask for a coarser precision, fewer aggregates in one query, or narrower bounds"),
            status=400)
    epsilon = min(_round_up(epsilon), EPSILON_MAX)
    notes = [f"precision first: ε={epsilon:.4g} per node gives every partial aggregate a "
             f"95% noise interval within ±{precision:g} (exact for counts and sums: the sum "
             f"of {len(nodes)} node(s)' Laplace noises, counts rounded)"]
    ratios = _ratios(query)
    if ratios:
        notes.append(f"{', '.join(ratios)}: computed from several partials (numerator and "
                     f"denominator each within ±{precision:g} at 95%, both at ≥ 90%); the "
                     "ratio's own interval is wider when its count is small")
    k = 1 if disjoint else len(nodes)
    return Price(precision, epsilon, epsilon * k, list(nodes), parts, notes)
