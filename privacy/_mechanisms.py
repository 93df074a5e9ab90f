"""DP releases through OpenDP, their calibration, and their privacy events.

Released noise comes only from OpenDP measurements (exact samplers, floating-point safe);
``numpy.random`` is used here only to compute *intervals* from public parameters, which is
post-processing and leaks nothing.

Unit of privacy: one pupil, neighbouring datasets differ by adding or removing one pupil
(dp-accounting's ``ADD_OR_REMOVE_ONE``). The node bounds each pupil to ``max_contrib`` rows
*in total over all groups* and clamps values to ``[lower, upper]`` before computing exact
partials in DuckDB; the helpers here only add noise to those partials. With that bound the
L1 sensitivity of a whole grouped vector (counts or clamped sums over a declared public key
set) is ``max_contrib * per-row bound``: one pupil's rows move at most that much mass in
total, however they spread over groups. So one vector costs one ε, exactly as parallel
composition over disjoint groups would give when each pupil sits in one group. If a node
bounds rows *per group* instead, pass ``max_contrib = per-group bound × max groups``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from privacy._events import (
    DpEvent,
    GaussianDpEvent,
    LaplaceDpEvent,
    SelfComposedDpEvent,
    ZCDpEvent,
)

if TYPE_CHECKING:
    import dp_accounting as dpa


def dp_available() -> bool:
    """Whether OpenDP, which makes every DP release, is installed (the ``dp`` extra: 171 MB,
    so a node serving no sensitive dataset may go without it). Looked up, not imported."""
    return importlib.util.find_spec("opendp") is not None


@lru_cache(maxsize=1)
def _opendp() -> Any:
    """OpenDP's prelude, imported on first use (a node serving no DP query never loads it)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")  # the noise measurements live behind "contrib"
    return dp


LEVEL = 0.95
_Z95 = 1.959964  # two-sided 95% standard-normal quantile
# Relative slack allowed when checking OpenDP's own privacy map against our calibration
# (float rounding of scale = sensitivity / ε); anything above is a calibration bug.
_MAP_SLACK = 1e-9


@dataclass(frozen=True)
class Release:
    """One released number with its noise scale and a 95% interval for the noise alone.

    The interval accounts for the added noise only: not for sampling variability and not
    for the bias introduced by clamping or contribution bounding.
    """

    value: float
    noise_scale: float
    ci_low: float
    ci_high: float
    mechanism: str


# --------------------------------------------------------------------------- calibration


def laplace_scale(sensitivity: float, epsilon: float) -> float:
    """Laplace parameter b for an ε-DP release of a query with this L1 sensitivity."""
    _positive(sensitivity=sensitivity, epsilon=epsilon)
    return sensitivity / epsilon


def gaussian_sigma(l2_sensitivity: float, epsilon: float, delta: float) -> float:
    """σ for an (ε, δ)-DP Gaussian release: the *analytic* Gaussian mechanism.

    Balle & Wang 2018 (via ``dp_accounting.get_sigma_gaussian``): the exact smallest σ for
    sensitivity 1, valid for any ε > 0 (the classic √(2 ln(1.25/δ))/ε needs ε < 1 and is
    looser), scaled linearly by the L2 sensitivity.
    """
    _positive(l2_sensitivity=l2_sensitivity, epsilon=epsilon)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    import dp_accounting as dpa

    return l2_sensitivity * float(dpa.get_sigma_gaussian(epsilon, delta))


def laplace_halfwidth(scale: float, level: float = LEVEL) -> float:
    """Half-width w with P(|Laplace(b)| ≤ w) = level: b·ln(1/(1−level)) (b·ln 20 at 95%)."""
    return scale * math.log(1.0 / (1.0 - level))


def gaussian_halfwidth(sigma: float, level: float = LEVEL) -> float:
    """Half-width w with P(|N(0, σ²)| ≤ w) = level (1.959964·σ at 95%)."""
    z = _Z95 if level == LEVEL else NormalDist().inv_cdf(0.5 + level / 2)
    return z * sigma


# ---------------------------------------------------------------------- raw vector noise


@lru_cache(maxsize=256)
def _laplace_meas(scale: float) -> Any:
    dp = _opendp()
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float)
    return dp.m.make_laplace(*space, scale=scale)


@lru_cache(maxsize=256)
def _gaussian_meas(sigma: float) -> Any:
    dp = _opendp()
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float)
    return dp.m.make_gaussian(*space, scale=sigma)


def laplace_noise(values: Sequence[float], scale: float) -> np.ndarray:
    """``values`` plus independent Laplace(scale) noise per coordinate (OpenDP sampler).

    Cost: ~30 µs per coordinate (exact sampling), so keep vectors to what is released.
    """
    _positive(scale=scale)
    vec = _finite_list(values)
    return np.asarray(_laplace_meas(float(scale))(vec), dtype=float) if vec else np.empty(0)


def gaussian_noise(values: Sequence[float], sigma: float) -> np.ndarray:
    """``values`` plus independent N(0, σ²) noise per coordinate (OpenDP sampler, ~70 µs)."""
    _positive(sigma=sigma)
    vec = _finite_list(values)
    return np.asarray(_gaussian_meas(float(sigma))(vec), dtype=float) if vec else np.empty(0)


def _laplace_release(values: Sequence[float], sensitivity: float, epsilon: float) -> np.ndarray:
    """Laplace release with OpenDP's own privacy map checked against the requested ε."""
    b = laplace_scale(sensitivity, epsilon)
    spent = _laplace_meas(b).map(float(sensitivity))
    if spent > epsilon * (1 + _MAP_SLACK):
        raise RuntimeError(f"OpenDP map says ε={spent} > requested {epsilon}")
    return laplace_noise(values, b)


# -------------------------------------------------------------------- DP aggregate helpers


def dp_count(true_counts: Sequence[float], epsilon: float, max_contrib: int = 1) -> list[Release]:
    """ε-DP counts per group. L1 sensitivity of the vector = ``max_contrib`` rows."""
    _check_contrib(max_contrib)
    b = laplace_scale(max_contrib, epsilon)
    noisy = _laplace_release(true_counts, max_contrib, epsilon)
    w = laplace_halfwidth(b)
    return [Release(float(v), b, float(v) - w, float(v) + w, "laplace") for v in noisy]


def dp_sum(
    true_sums: Sequence[float], epsilon: float, lower: float, upper: float, max_contrib: int = 1
) -> list[Release]:
    """ε-DP sums of values clamped to [lower, upper] per group.

    L1 sensitivity = ``max_contrib · max(|lower|, |upper|)`` (add/remove one pupil).
    """
    _check_bounds(lower, upper)
    _check_contrib(max_contrib)
    sens = max_contrib * max(abs(lower), abs(upper))
    b = laplace_scale(sens, epsilon)
    noisy = _laplace_release(true_sums, sens, epsilon)
    w = laplace_halfwidth(b)
    return [Release(float(v), b, float(v) - w, float(v) + w, "laplace") for v in noisy]


def dp_mean(
    true_sums: Sequence[float],
    true_counts: Sequence[float],
    epsilon: float,
    lower: float,
    upper: float,
    max_contrib: int = 1,
) -> list[Release]:
    """ε-DP means: noisy centred sum / noisy count, budget split ε/2 + ε/2.

    The exact sum is centred at m = (lower+upper)/2 before noise (S − m·C, still an exact
    partial), which halves its sensitivity to ``max_contrib·(upper−lower)/2``; the count
    has sensitivity ``max_contrib``. Both vectors are Laplace, each at ε/2 (sequential
    composition: see ``aggregate_event("mean", ε)``). The mean is clamped to [lower, upper].
    ``noise_scale`` is the delta-method standard deviation of the noise in the ratio; the
    interval is the 95% quantile of the linearised noise (S̃ and C̃ plugged in), so it is
    approximate, and poor when the count is small.
    """
    _check_bounds(lower, upper)
    _check_contrib(max_contrib)
    sums, counts = _same_length(true_sums, true_counts)
    mid, half = (lower + upper) / 2, (upper - lower) / 2
    eps_each = epsilon / 2
    b_sum, b_cnt = laplace_scale(max_contrib * half, eps_each), laplace_scale(max_contrib, eps_each)
    c_noisy = _laplace_release(counts, max_contrib, eps_each)
    s_noisy = _laplace_release(sums - mid * counts, max_contrib * half, eps_each)
    out = []
    for s, c in zip(s_noisy, c_noisy, strict=True):
        n = max(float(c), 1.0)
        m_c = float(np.clip(s / n, -half, half))  # centred mean
        # error ≈ (N_sum − m_c·N_cnt) / n  (first order in the noises)
        scales = (b_sum / n, abs(m_c) * b_cnt / n)
        sd = math.sqrt(2 * sum(x * x for x in scales))
        w = _laplace_mix_halfwidth(scales)
        v = mid + m_c
        out.append(Release(v, sd, max(lower, v - w), min(upper, v + w), "laplace-ratio"))
    return out


def dp_variance(
    true_sums: Sequence[float],
    true_sumsq: Sequence[float],
    true_counts: Sequence[float],
    epsilon: float,
    lower: float,
    upper: float,
    max_contrib: int = 1,
) -> list[Release]:
    """ε-DP (population) variances from count, sum and sum of squares, ε/3 each.

    Values are centred at m = (lower+upper)/2 on the exact partials (S_c = S − mC,
    Q_c = Q − 2mS + m²C), so sensitivities are ``max_contrib`` (count),
    ``max_contrib·h`` (S_c) and ``max_contrib·h²`` (Q_c) with h = (upper−lower)/2.
    Variance = Q_c/C − (S_c/C)², clamped to [0, h²]. Interval: linearised noise, as in
    ``dp_mean`` (approximate).
    """
    _check_bounds(lower, upper)
    _check_contrib(max_contrib)
    sums, counts = _same_length(true_sums, true_counts)
    sumsq, _ = _same_length(true_sumsq, true_counts)
    mid, half = (lower + upper) / 2, (upper - lower) / 2
    eps_each = epsilon / 3
    k = max_contrib
    b_c, b_s, b_q = (laplace_scale(k * x, eps_each) for x in (1.0, half, half * half))
    c_noisy = _laplace_release(counts, k, eps_each)
    s_noisy = _laplace_release(sums - mid * counts, k * half, eps_each)
    q_noisy = _laplace_release(sumsq - 2 * mid * sums + mid * mid * counts, k * half**2, eps_each)
    out = []
    for c, s, q in zip(c_noisy, s_noisy, q_noisy, strict=True):
        n = max(float(c), 1.0)
        mu = float(np.clip(s / n, -half, half))
        mom2 = float(np.clip(q / n, 0.0, half * half))
        v = float(np.clip(mom2 - mu * mu, 0.0, half * half))
        # dV ≈ (N_q − 2μ·N_s − (Q/C − 2μ²)·N_c) / n
        scales = (b_q / n, 2 * abs(mu) * b_s / n, abs(mom2 - 2 * mu * mu) * b_c / n)
        sd = math.sqrt(2 * sum(x * x for x in scales))
        w = _laplace_mix_halfwidth(scales)
        out.append(Release(v, sd, max(0.0, v - w), min(half * half, v + w), "laplace-ratio"))
    return out


def dp_quantile(
    values: Sequence[float],
    q: float,
    lower: float,
    upper: float,
    epsilon: float,
    max_contrib: int = 1,
    n_candidates: int = 1001,
) -> Release:
    """ε-DP q-quantile: OpenDP ``make_private_quantile`` (exponential mechanism, Gumbel).

    Candidates: ``n_candidates`` evenly spaced points of [lower, upper] (public); the
    release is always one of them. Score of c: |(1−q)·#{x<c} − q·#{x>c}| (rank units), whose
    range changes by ≤ 2·max(q, 1−q) per row, so the Gumbel scale is
    s = 2·max(q, 1−q)·max_contrib/ε. This is ε-DP and (bounded range) ε²/8-zCDP; it is
    built with OpenDP's zCDP output measure and checked with OpenDP's map, and it is charged
    as ``ZCDpEvent(ε²/8)`` (``aggregate_event("quantile", ε)``).

    ``noise_scale`` is s, in *rank* units. ``ci_low``/``ci_high`` are the neighbouring grid
    points: the resolution of the answer, NOT a 95% coverage interval. The exponential
    mechanism's guarantee is in rank space — see ``quantile_rank_error``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    _check_bounds(lower, upper)
    _check_contrib(max_contrib)
    _positive(epsilon=epsilon)
    if n_candidates < 2:
        raise ValueError("n_candidates must be at least 2")
    cands = [float(c) for c in np.linspace(lower, upper, n_candidates)]
    scale = quantile_gumbel_scale(epsilon, q, max_contrib)
    dp = _opendp()
    dom = dp.vector_domain(dp.atom_domain(T=float, nan=False))
    meas = dp.m.make_private_quantile(
        dom, dp.symmetric_distance(), dp.zero_concentrated_divergence(), cands, q, scale
    )
    rho = meas.map(max_contrib)
    if rho > epsilon**2 / 8 * (1 + _MAP_SLACK):
        raise RuntimeError(f"OpenDP map says rho={rho} > ε²/8={epsilon**2 / 8}")
    value = float(meas(_finite_list(values)))
    step = cands[1] - cands[0]
    return Release(value, scale, max(lower, value - step), min(upper, value + step), "quantile")


def quantile_gumbel_scale(epsilon: float, q: float, max_contrib: int = 1) -> float:
    """Gumbel scale (rank units) of ``dp_quantile`` for this ε: 2·max(q, 1−q)·k/ε."""
    return 2 * max(q, 1 - q) * max_contrib / epsilon


def quantile_rank_error(
    epsilon: float, q: float, n_candidates: int, max_contrib: int = 1, beta: float = 0.05
) -> float:
    """Rank error t such that, with probability ≥ 1−β, ``dp_quantile``'s release c has
    |(1−q)·#{x<c} − q·#{x>c}| ≤ OPT + t, OPT being the best candidate's score.

    Exponential-mechanism utility bound: P(score > OPT + t) ≤ |C|·exp(−t/s), so
    t = s·ln(|C|/β). Divide by n for an error in quantile level (q ± t/n).
    """
    return quantile_gumbel_scale(epsilon, q, max_contrib) * math.log(n_candidates / beta)


# ------------------------------------------------------------------------ privacy events
# Laplace, Gaussian and zCDP events are the closed-form classes of privacy/_events.py (same
# names and JSON as dp-accounting's): a SQL node charges them without dp-accounting.


def laplace_event(epsilon: float) -> DpEvent:
    """Event of one ε-DP Laplace release (noise multiplier b/Δ = 1/ε)."""
    _positive(epsilon=epsilon)
    return LaplaceDpEvent(noise_multiplier=1.0 / epsilon)


def gaussian_event(sigma_over_sensitivity: float) -> DpEvent:
    """Event of one Gaussian release with σ / L2-sensitivity = ``sigma_over_sensitivity``."""
    _positive(sigma_over_sensitivity=sigma_over_sensitivity)
    return GaussianDpEvent(noise_multiplier=sigma_over_sensitivity)


def opacus_event(history: Iterable[Sequence[float]]) -> dpa.DpEvent:
    """Event of a DP-SGD run from Opacus ``accountant.history``.

    Each entry ``(noise_multiplier, sample_rate, steps)`` becomes
    ``SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)``; entries are composed.
    """
    import dp_accounting as dpa

    parts: list[dpa.DpEvent] = []
    for entry in history:
        sigma, rate, steps = entry
        if not (0 < rate <= 1) or sigma <= 0 or int(steps) != steps or steps < 0:
            raise ValueError(f"bad Opacus history entry {entry!r}")
        inner = dpa.PoissonSampledDpEvent(float(rate), dpa.GaussianDpEvent(float(sigma)))
        parts.append(dpa.SelfComposedDpEvent(inner, int(steps)))
    return dpa.ComposedDpEvent(parts)


def aggregate_event(kind: str, epsilon: float) -> DpEvent:
    """Event to charge *before* calling the matching ``dp_*`` helper with this ε.

    count/sum: one Laplace(ε); mean: two Laplace(ε/2); variance: three Laplace(ε/3);
    quantile: ``ZCDpEvent(ε²/8)`` (exponential mechanism, bounded range). The whole grouped
    vector is one event (see the module docstring on sensitivity).
    """
    parts = {"count": 1, "sum": 1, "mean": 2, "variance": 3}
    if kind in parts:
        n = parts[kind]
        one = laplace_event(epsilon / n)
        return one if n == 1 else SelfComposedDpEvent(one, n)
    if kind == "quantile":
        _positive(epsilon=epsilon)
        return ZCDpEvent(rho=epsilon**2 / 8)
    raise ValueError(f"unknown aggregate kind {kind!r}")


# ---------------------------------------------------------------------------- internals


def _laplace_mix_halfwidth(scales: Sequence[float], level: float = LEVEL) -> float:
    """Half-width of |Σ s_i·L_i| at ``level``, L_i independent standard Laplace.

    One term: exact. Two terms: exact tail P(|X| > t) = (a²e^(−t/a) − b²e^(−t/b))/(a² − b²)
    (→ (1 + t/2a)·e^(−t/a) as b → a), inverted by bisection. Three: Monte Carlo over a
    fixed, seeded table of standard Laplace draws (post-processing of public scales, not
    released noise; deterministic, relative error ≈ 1%).
    """
    live = [float(s) for s in scales if s > 0]
    top = max(live, default=0.0)
    live = sorted((s for s in live if s > 1e-9 * top), reverse=True)
    if len(live) <= 1:
        return laplace_halfwidth(top, level)
    if len(live) == 2:
        a, b = live
        if a - b < 1e-3 * a:
            a = b = (a + b) / 2

            def tail(t: float) -> float:
                return (1 + t / (2 * a)) * math.exp(-t / a)
        else:

            def tail(t: float) -> float:
                return (a * a * math.exp(-t / a) - b * b * math.exp(-t / b)) / (a * a - b * b)

        lo, hi = 0.0, 2 * (a + b) * math.log(1 / (1 - level)) + a
        for _ in range(80):  # tail is decreasing in t
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if tail(mid) > 1 - level else (lo, mid)
        return hi
    table = _std_laplace_table()
    draws = sum(s * table[i] for i, s in enumerate(live))
    return float(np.quantile(np.abs(draws), level))


@lru_cache(maxsize=1)
def _std_laplace_table() -> np.ndarray:
    return np.random.default_rng(20240601).laplace(0.0, 1.0, size=(3, 40_000))


def _finite_list(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError("values must be finite")
    return out


def _same_length(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(_finite_list(a)), np.asarray(_finite_list(b))
    if x.shape != y.shape:
        raise ValueError(f"partials differ in length: {len(x)} vs {len(y)}")
    return x, y


def _positive(**kw: float) -> None:
    for name, v in kw.items():
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be positive and finite, got {v}")


def _check_bounds(lower: float, upper: float) -> None:
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise ValueError(f"need finite lower < upper, got [{lower}, {upper}]")


def _check_contrib(max_contrib: int) -> None:
    if int(max_contrib) != max_contrib or max_contrib < 1:
        raise ValueError(f"max_contrib must be a positive integer, got {max_contrib}")
