"""Noise searches of DP training: the σ that makes a run fit a budget (RDP accounting).

Pure functions of public parameters (budgets, δ, sampling rate, step counts), no data:

- ``sigma_for_eval``: σ of a Gaussian release (L2 sensitivity 1) such that ``rounds`` of
  them cost a given ε (the nodes' noisy evaluations and counts);
- ``calibrate``: the smallest DP-SGD noise multiplier (within ``SIGMA_RANGE``) with which a
  whole run — its rounds (DP-SGD and evaluation each) and the final model's evaluation —
  fits both its own target and the cap left by what was spent before;
- ``per_node_target``: the ε target of each of k nodes such that their runs compose to
  about a total (the coordinator's split of a run's budget);
- ``round_event``: the event of one training round (DP-SGD, then its evaluation).
"""

from __future__ import annotations

import math

import dp_accounting as dpa

from privacy._accounting import RdpTotals
from privacy._mechanisms import gaussian_event, opacus_event

# The DP-SGD noise multipliers ``calibrate`` searches (and the smallest a run may ask for:
# bulle_flower.spec.NOISE_MULTIPLIER_MIN, the same floor)
SIGMA_RANGE = (0.5, 200.0)


def round_event(sigma: float, sample_rate: float, steps: int, sigma_eval: float) -> dpa.DpEvent:
    """One training round: ``steps`` DP-SGD steps (σ, Poisson rate ``sample_rate``), then
    the Gaussian evaluation release of σ ``sigma_eval``."""
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
              sigma_final: float | None = None, charged: RdpTotals | None = None
              ) -> float | None:
    """Smallest σ (within ``SIGMA_RANGE``) such that the run of ``rounds`` rounds costs at
    most ``target`` ε on its own and ``prior`` plus the run stays within ``cap`` (both at
    δ); None if even the largest σ does not fit. (RDP composition is sublinear: the run's
    own ε is larger than what it adds to a prior spend, so both are checked.) The final
    model's evaluation has σ ``sigma_final`` (default: ``sigma_eval``); ``charged``: what
    the run already spent here (its plan's count), also in ``prior``."""
    own = charged or RdpTotals()

    def fits(sigma: float) -> bool:
        run = dpa.ComposedDpEvent([  # the rounds, then the final model's evaluation
            dpa.SelfComposedDpEvent(round_event(sigma, sample_rate, steps, sigma_eval), rounds),
            gaussian_event(sigma_final or sigma_eval)])
        return (own.plus(run).epsilon(delta) <= target
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


def per_node_target(total: float, k: int, delta: float) -> float:
    """ε per node such that k nodes' runs compose to about ``total`` at δ.

    Proxy: k Gaussian mechanisms of σ compose to one of σ/√k. Composing DP-SGD runs (sub-
    sampled Gaussians) costs less than that proxy (measured: 87–98 % of ``total``), so the
    run stays under ``total``; the global ledger checks the real events anyway.
    """
    if k <= 1:
        return total
    lo, hi = 0.01, 1e4
    for _ in range(60):  # σ of one Gaussian release costing ``total``
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if RdpTotals().plus(gaussian_event(mid)).epsilon(delta) > total \
            else (lo, mid)
    return RdpTotals().plus(gaussian_event(hi * math.sqrt(k))).epsilon(delta)
