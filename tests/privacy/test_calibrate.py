"""The noise searches of DP training (``privacy._calibrate``): plain numbers, no servers."""

from __future__ import annotations

import dp_accounting as dpa
import pytest

from privacy import (
    SIGMA_RANGE,
    RdpTotals,
    calibrate,
    gaussian_event,
    per_node_target,
    round_event,
    sigma_for_eval,
)

DELTA, Q, STEPS, ROUNDS = 1e-6, 0.05, 20, 3


def run_cost(sigma: float, sigma_eval: float, prior: RdpTotals | None = None,
             sigma_final: float | None = None) -> float:
    """ε of ``prior`` plus a whole run at σ: its rounds, then the final evaluation."""
    run = dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(round_event(sigma, Q, STEPS, sigma_eval), ROUNDS),
        gaussian_event(sigma_final or sigma_eval)])
    return (prior or RdpTotals()).plus(run).epsilon(DELTA)


def test_noise_is_calibrated_to_the_budget_left() -> None:
    sigma_eval = sigma_for_eval(ROUNDS, 0.2, DELTA)
    fresh = calibrate(RdpTotals(), 5.0, 1.0, DELTA, Q, STEPS, ROUNDS, sigma_eval)
    run = RdpTotals().plus(round_event(fresh, Q, STEPS, sigma_eval))
    for _ in range(ROUNDS - 1):
        run = run.plus(round_event(fresh, Q, STEPS, sigma_eval))
    assert 0.97 < run.epsilon(DELTA) <= 1.0
    prior = RdpTotals().plus(round_event(2.0, Q, STEPS, sigma_eval))  # ε ≈ 0.72 spent
    later = calibrate(prior, 1.0, 1.0, DELTA, Q, STEPS, ROUNDS, sigma_eval)
    assert later > fresh  # what was spent before leaves less: more noise
    after = prior
    for _ in range(ROUNDS):
        after = after.plus(round_event(later, Q, STEPS, sigma_eval))
    assert 0.97 < after.epsilon(DELTA) <= 1.0  # the cap, over both
    assert calibrate(RdpTotals(), 5.0, 1e-4, DELTA, Q, STEPS, ROUNDS, sigma_eval) is None
    assert SIGMA_RANGE[0] <= fresh <= SIGMA_RANGE[1]


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0])
def test_the_sigma_found_is_the_smallest_that_fits(target: float) -> None:
    sigma_eval = sigma_for_eval(2 * ROUNDS + 1, 0.2 * target, DELTA)
    sigma = calibrate(RdpTotals(), 100.0, target, DELTA, Q, STEPS, ROUNDS, sigma_eval)
    assert sigma is not None and SIGMA_RANGE[0] < sigma < SIGMA_RANGE[1]
    assert run_cost(sigma, sigma_eval) <= target
    assert run_cost(sigma * 0.99, sigma_eval) > target  # 1 % less noise: over the target


def test_the_cap_left_by_a_prior_spend_binds_too() -> None:
    sigma_eval = sigma_for_eval(2 * ROUNDS + 1, 0.2, DELTA)
    alone = calibrate(RdpTotals(), 100.0, 1.0, DELTA, Q, STEPS, ROUNDS, sigma_eval)
    prior = RdpTotals().plus(gaussian_event(1.0))  # ε ≈ 5.2 spent before the run
    # RDP composes sublinearly: the run adds ≈ 0.11 to that spend; leave it only 0.1
    cap = prior.epsilon(DELTA) + 0.1
    sigma = calibrate(prior, cap, 1.0, DELTA, Q, STEPS, ROUNDS, sigma_eval)
    assert alone is not None and sigma is not None and sigma > alone  # the cap chose σ
    assert run_cost(sigma, sigma_eval, prior) <= cap
    assert run_cost(sigma * 0.99, sigma_eval, prior) > cap
    assert run_cost(sigma, sigma_eval) < 1.0


def test_what_the_run_already_charged_counts_against_its_target() -> None:
    sigma_eval = sigma_for_eval(2 * ROUNDS + 1, 0.2, DELTA)
    count = RdpTotals().plus(gaussian_event(sigma_eval))  # the plan's noisy count
    with_count = calibrate(count, 100.0, 1.0, DELTA, Q, STEPS, ROUNDS, sigma_eval,
                           sigma_final=sigma_eval / ROUNDS ** 0.5, charged=count)
    without = calibrate(RdpTotals(), 100.0, 1.0, DELTA, Q, STEPS, ROUNDS, sigma_eval,
                        sigma_final=sigma_eval / ROUNDS ** 0.5)
    assert with_count is not None and without is not None and with_count > without
    assert run_cost(with_count, sigma_eval, count, sigma_eval / ROUNDS ** 0.5) <= 1.0


def test_the_range_ends() -> None:
    sigma_eval = sigma_for_eval(1, 10.0, DELTA)
    # a huge budget: the smallest σ of the range already fits
    assert calibrate(RdpTotals(), 1e3, 1e3, DELTA, Q, STEPS, 1, sigma_eval) == SIGMA_RANGE[0]
    # the evaluations alone spend more than the target: nothing fits
    assert calibrate(RdpTotals(), 5.0, 0.01, DELTA, Q, STEPS, ROUNDS, sigma_eval) is None


@pytest.mark.parametrize("rounds,epsilon", [(1, 0.1), (7, 0.2), (21, 2.0)])
def test_sigma_for_eval_spends_what_it_is_given(rounds: int, epsilon: float) -> None:
    sigma = sigma_for_eval(rounds, epsilon, DELTA)
    cost = RdpTotals().plus(dpa.SelfComposedDpEvent(gaussian_event(sigma), rounds))
    assert epsilon * 0.999 <= cost.epsilon(DELTA) <= epsilon
    less = RdpTotals().plus(dpa.SelfComposedDpEvent(gaussian_event(sigma * 0.999), rounds))
    assert less.epsilon(DELTA) > epsilon


def test_per_node_targets_compose_to_about_the_total() -> None:
    assert per_node_target(1.0, 1, DELTA) == 1.0
    each = per_node_target(1.0, 3, DELTA)
    assert each < 1.0
    # proxy: k Gaussians of σ√k compose to one of σ, which costs the total
    sigma = sigma_for_eval(1, each, DELTA)
    assert RdpTotals().plus(gaussian_event(sigma / 3 ** 0.5)).epsilon(DELTA) == \
        pytest.approx(1.0, rel=1e-3)
