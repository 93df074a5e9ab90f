"""Statistical tests of the DP mechanisms.

OpenDP's sampler cannot be seeded, so every test draws enough samples that a false failure
needs a deviation of at least 6 standard errors (mostly 7 or more; probability < 1e-8 per
check), and the tolerances are shown to *fail* on a deliberately wrong scale, interval or
mechanism (the ``*_rejects_*`` tests and the "must fail" asserts), so the checks have power.
Checked once by hand as well: making the released noise 30% smaller than declared fails the
count, sum, mean-coverage and neighbouring tests; 10% smaller fails the scale checks.
Cost: OpenDP's exact samplers take ~30 µs (Laplace) / ~70 µs (Gaussian) per draw.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from privacy import (
    aggregate_event,
    dp_count,
    dp_mean,
    dp_quantile,
    dp_sum,
    dp_variance,
    gaussian_halfwidth,
    gaussian_noise,
    gaussian_sigma,
    laplace_event,
    laplace_halfwidth,
    laplace_noise,
    laplace_scale,
    quantile_rank_error,
)
from privacy._mechanisms import quantile_gumbel_scale

# ------------------------------------------------------------------------ scale checks

SCALE_TOL = 0.05  # relative; the standard error of each estimator below is ≤ 0.71%


def laplace_scale_ok(noise: np.ndarray, b: float) -> bool:
    # E|X| = b and sd|X| = b for Laplace(b): s.e. of the mean is b/√N (0.71% at N=20,000),
    # so 5% is 7 standard errors.
    return abs(np.mean(np.abs(noise)) / b - 1) < SCALE_TOL


def gaussian_scale_ok(noise: np.ndarray, sigma: float) -> bool:
    # s.e. of the sample sd is ≈ σ/√(2N) (0.71% at N=10,000): 5% is 7 standard errors.
    return abs(np.sqrt(np.mean(noise**2)) / sigma - 1) < SCALE_TOL


@pytest.fixture(scope="module")
def laplace_draws() -> tuple[np.ndarray, float]:
    b = 2.0
    return laplace_noise([0.0] * 20_000, b), b


@pytest.fixture(scope="module")
def gaussian_draws() -> tuple[np.ndarray, float]:
    sigma = 3.0
    return gaussian_noise([0.0] * 10_000, sigma), sigma


def test_laplace_empirical_scale(laplace_draws: tuple[np.ndarray, float]) -> None:
    noise, b = laplace_draws
    assert laplace_scale_ok(noise, b)
    assert abs(np.mean(noise)) < 7 * math.sqrt(2) * b / math.sqrt(len(noise))


def test_laplace_scale_check_rejects_wrong_scale(laplace_draws: tuple[np.ndarray, float]) -> None:
    # The same check, told the wrong scale (10% off), must fail.
    noise, b = laplace_draws
    assert not laplace_scale_ok(noise, 1.1 * b)
    assert not laplace_scale_ok(noise, b / 1.1)


def test_gaussian_empirical_scale(gaussian_draws: tuple[np.ndarray, float]) -> None:
    noise, sigma = gaussian_draws
    assert gaussian_scale_ok(noise, sigma)
    assert not gaussian_scale_ok(noise, 1.1 * sigma)


def test_noise_is_added_to_values() -> None:
    out = laplace_noise([1e6, -1e6], 1.0)
    assert out.shape == (2,) and abs(out[0] - 1e6) < 60 and abs(out[1] + 1e6) < 60


# --------------------------------------------------------------------------- coverage

COVER_LOW, COVER_HIGH = 0.93, 0.97  # at N=10,000 trials s.e. is 0.22%: the band is ±9 s.e.


def coverage(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, truth: float) -> float:
    return float(np.mean((lo <= truth) & (truth <= hi)))


def test_count_interval_coverage() -> None:
    truth, eps = 40.0, 0.5
    rel = dp_count([truth] * 20_000, eps, max_contrib=2)  # 20,000 independent releases
    v = np.array([r.value for r in rel])
    assert {r.noise_scale for r in rel} == {laplace_scale(2, eps)}
    lo, hi = np.array([r.ci_low for r in rel]), np.array([r.ci_high for r in rel])
    assert COVER_LOW <= coverage(v, lo, hi, truth) <= COVER_HIGH
    assert laplace_scale_ok(v - truth, laplace_scale(2, eps))
    # The same draws with the half-width of a scale 30% too small cover ~90%: rejected.
    w = laplace_halfwidth(laplace_scale(2, eps) / 1.3)
    assert not COVER_LOW <= coverage(v, v - w, v + w, truth) <= COVER_HIGH


def test_sum_interval_coverage() -> None:
    truth = 1234.5
    rel = dp_sum([truth] * 20_000, 1.0, lower=-5.0, upper=10.0, max_contrib=3)
    assert rel[0].noise_scale == pytest.approx(30.0)  # 3 rows × max(|−5|, |10|) / ε
    v = np.array([r.value for r in rel])
    lo, hi = np.array([r.ci_low for r in rel]), np.array([r.ci_high for r in rel])
    assert COVER_LOW <= coverage(v, lo, hi, truth) <= COVER_HIGH
    assert laplace_scale_ok(v - truth, 30.0)


def test_gaussian_interval_coverage(gaussian_draws: tuple[np.ndarray, float]) -> None:
    noise, sigma = gaussian_draws
    w = gaussian_halfwidth(sigma)
    assert w == pytest.approx(1.959964 * sigma)
    assert COVER_LOW <= coverage(noise, noise - w, noise + w, 0.0) <= COVER_HIGH
    w_bad = gaussian_halfwidth(sigma / 1.2)
    assert not COVER_LOW <= coverage(noise, noise - w_bad, noise + w_bad, 0.0) <= COVER_HIGH


def test_mean_interval_coverage() -> None:
    # Noise-only interval of the ratio estimator (linearised; measured coverage 95.2% over
    # 20,000 trials at n = 500). 6,000 trials: s.e. 0.28%, band edges ≥ 6 s.e. away.
    n, mean, trials = 500.0, 7.0, 6_000
    rel = dp_mean([mean * n] * trials, [n] * trials, 1.0, lower=0.0, upper=10.0)
    v = np.array([r.value for r in rel])
    lo, hi = np.array([r.ci_low for r in rel]), np.array([r.ci_high for r in rel])
    assert COVER_LOW <= coverage(v, lo, hi, mean) <= COVER_HIGH


def test_variance_noise_scale() -> None:
    # Data with mean 6 and variance 4 on [0, 10]: the spread of the released variances
    # matches the declared (delta-method) noise scale within 10% (s.e. of an sd over 3,000
    # trials is 1.3%; the declared scale, a first-order approximation, is ~1.3% high).
    n, mu, var, trials = 1000.0, 6.0, 4.0, 3_000
    rel = dp_variance([mu * n] * trials, [(var + mu * mu) * n] * trials, [n] * trials, 1.0,
                      0.0, 10.0)  # fmt: skip
    v = np.array([r.value for r in rel])
    assert abs(np.std(v - var) / rel[0].noise_scale - 1) < 0.10
    assert abs(np.mean(v) - var) < 7 * rel[0].noise_scale / math.sqrt(trials)
    assert all(r.ci_low <= r.value <= r.ci_high for r in rel)


# ----------------------------------------------------------- neighbouring datasets (ε)


def max_log_ratio(a: np.ndarray, b: np.ndarray, min_count: int) -> tuple[float, float]:
    """Largest |log(p_a/p_b)| over bins where both histograms hold ≥ min_count draws,
    and that ratio's standard error bound √(2/min_count)."""
    edges = np.arange(-10.0, 11.0, 0.5)
    ha, _ = np.histogram(a, edges)
    hb, _ = np.histogram(b, edges)
    ok = (ha >= min_count) & (hb >= min_count)
    assert ok.sum() >= 4, "too few populated bins for a meaningful test"
    ratio = np.log(ha[ok] / hb[ok])
    return float(np.max(np.abs(ratio))), math.sqrt(2 / min_count)


def test_count_neighbouring_datasets_respect_epsilon() -> None:
    eps, n, trials = 1.0, 100.0, 50_000
    a = np.array([r.value for r in dp_count([n] * trials, eps)]) - n
    b = np.array([r.value for r in dp_count([n + 1] * trials, eps)]) - n
    worst, se = max_log_ratio(a, b, min_count=2_000)
    # log-ratio tolerance 7 s.e. (≈ 0.22): a ratio above e^ε·1.25 would be a privacy bug.
    assert worst <= eps + 7 * se
    # and the test has power here: the tails of Laplace reach the e^ε ratio
    assert worst >= eps - 7 * se


def test_neighbouring_check_rejects_too_little_noise() -> None:
    # A mechanism with half the declared noise (true ε = 2) fails the ε = 1 check.
    eps, trials = 1.0, 20_000
    a = laplace_noise([0.0] * trials, 0.5)
    b = laplace_noise([1.0] * trials, 0.5)
    worst, se = max_log_ratio(a, b, min_count=500)
    assert worst > eps + 7 * se


# ------------------------------------------------------------------------- quantile


def rank_score(data: np.ndarray, c: float, q: float) -> float:
    return abs((1 - q) * np.sum(data < c) - q * np.sum(data > c))


def test_quantile_within_rank_bound() -> None:
    rng = np.random.default_rng(7)  # the data, not the noise, is seeded
    data = rng.uniform(0, 100, 1_001)
    q, eps, n_cand = 0.5, 1.0, 1001
    cands = np.linspace(0, 100, n_cand)
    opt = min(rank_score(data, c, q) for c in cands)
    # β = 1e-9 so a false failure over 30 trials is < 3e-8.
    t = quantile_rank_error(eps, q, n_cand, beta=1e-9)
    for _ in range(30):
        r = dp_quantile(data, q, 0.0, 100.0, eps, n_candidates=n_cand)
        assert r.value in set(cands.tolist())
        assert rank_score(data, r.value, q) <= opt + t
        assert r.ci_low <= r.value <= r.ci_high and r.ci_high - r.ci_low <= 0.2 + 1e-9
        assert r.noise_scale == quantile_gumbel_scale(eps, q)


def test_quantile_declared_scale_matches_behaviour() -> None:
    # The exponential mechanism picks c with probability ∝ exp(−score(c)/s): the mean score
    # of 300 releases must match that law for the declared s (7 s.e.), and not for s/2 or 3s.
    data, q, eps, n_cand, trials = np.arange(0.0, 1001.0), 0.5, 0.1, 201, 300
    cands = np.linspace(0, 1000, n_cand)
    score = np.array([rank_score(data, c, q) for c in cands])

    def law(s: float) -> tuple[float, float]:
        p = np.exp(-(score - score.min()) / s)
        p /= p.sum()
        mean = float(p @ score)
        return mean, math.sqrt(float(p @ (score - mean) ** 2) / trials)

    s = quantile_gumbel_scale(eps, q)
    got = []
    for _ in range(trials):
        v = dp_quantile(data, q, 0.0, 1000.0, eps, n_candidates=n_cand).value
        got.append(score[int(np.argmin(np.abs(cands - v)))])
    for scale, should_match in ((s, True), (s / 2, False), (3 * s, False)):
        mean, se = law(scale)
        assert bool(abs(np.mean(got) - mean) <= 7 * se) == should_match


def test_quantile_other_levels_and_contrib() -> None:
    data = np.arange(0.0, 1000.0)
    r = dp_quantile(data, 0.25, 0.0, 1000.0, 50.0, max_contrib=2, n_candidates=101)
    assert abs(r.value - 250.0) <= 20.0  # ε = 50: rank error ≤ 0.06·ln(101/1e-9) ≈ 1.6
    assert r.noise_scale == pytest.approx(2 * 0.75 * 2 / 50.0)


# ----------------------------------------------------------- calibration and events


def test_gaussian_sigma_is_analytic() -> None:
    import dp_accounting as dpa

    sigma = gaussian_sigma(2.0, 1.0, 1e-5)
    # σ/Δ gives back ε = 1 at δ = 1e-5 under the exact (analytic) Gaussian curve,
    # below the classic bound √(2 ln(1.25/δ)).
    assert dpa.get_epsilon_gaussian(sigma / 2.0, 1e-5) == pytest.approx(1.0, rel=1e-6)
    assert sigma < 2.0 * math.sqrt(2 * math.log(1.25 / 1e-5))


def test_events_and_argument_checks() -> None:
    assert laplace_event(0.25).noise_multiplier == 4.0
    assert aggregate_event("variance", 0.3).count == 3
    with pytest.raises(ValueError):
        dp_count([1.0], 0.0)
    with pytest.raises(ValueError):
        dp_sum([1.0], 1.0, 5.0, 1.0)
    with pytest.raises(ValueError):
        laplace_noise([float("nan")], 1.0)
    with pytest.raises(ValueError):
        aggregate_event("median", 1.0)
