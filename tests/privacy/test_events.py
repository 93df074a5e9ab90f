"""The closed-form events (privacy/_events.py) against dp-accounting, their reference.

A SQL node charges its releases without dp-accounting: the RDP of each event must equal
dp-accounting's ``RdpAccountant`` at the ledger's orders, and the events must serialise to
the very JSON dp-accounting's events give (ledgers on disk store it).
"""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from privacy import (
    ComposedDpEvent,
    GaussianDpEvent,
    LaplaceDpEvent,
    RdpTotals,
    SelfComposedDpEvent,
    ZCDpEvent,
    aggregate_event,
    event_from_dict,
    event_to_dict,
    gaussian_event,
    laplace_event,
    opacus_event,
    pld_epsilon,
)
from privacy._accounting import ORDERS, event_key, event_rdp

# noise multipliers b/Δ and σ/Δ, extreme ones included: ε = 1/b from 1e-6 to 1e4
LAPLACE = [1e-4, 1e-3, 0.01, 0.1, 0.37, 1.0, 2.5, 10.0, 100.0, 1e4, 1e6]
GAUSSIAN = [1e-3, 0.05, 0.3, 1.0, 1.1, 7.0, 100.0, 1e5]
ZCDP = [(1e-9, 0.0), (1e-3, 0.0), (0.125, 0.0), (2.0, 0.5), (50.0, 0.0)]


def reference(event: dpa.DpEvent) -> np.ndarray:
    acc = RdpAccountant(orders=ORDERS)
    acc.compose(event)
    return np.asarray(acc.rdp)


def twin(event) -> dpa.DpEvent:
    """The same event built from dp-accounting's classes."""
    if isinstance(event, LaplaceDpEvent):
        return dpa.LaplaceDpEvent(event.noise_multiplier)
    if isinstance(event, GaussianDpEvent):
        return dpa.GaussianDpEvent(event.noise_multiplier)
    if isinstance(event, ZCDpEvent):
        return dpa.ZCDpEvent(event.rho, event.xi)
    if isinstance(event, SelfComposedDpEvent):
        return dpa.SelfComposedDpEvent(twin(event.event), event.count)
    if isinstance(event, ComposedDpEvent):
        return dpa.ComposedDpEvent([twin(e) for e in event.events])
    return event  # already dp-accounting's (DP-SGD)


def singles() -> list:
    return ([LaplaceDpEvent(b) for b in LAPLACE] + [GaussianDpEvent(s) for s in GAUSSIAN]
            + [ZCDpEvent(rho, xi) for rho, xi in ZCDP])


def composed() -> list:
    return [
        aggregate_event("count", 0.3), aggregate_event("mean", 1.0),
        aggregate_event("variance", 0.01), aggregate_event("quantile", 2.0),
        ComposedDpEvent([laplace_event(0.5)] * 4),  # a node's plan of four partials
        SelfComposedDpEvent(ComposedDpEvent([laplace_event(1e-3), gaussian_event(0.8),
                                             ZCDpEvent(0.01)]), 250),
        ComposedDpEvent([SelfComposedDpEvent(laplace_event(50.0), 3), ComposedDpEvent([])]),
    ]


@pytest.mark.parametrize("event", singles() + composed(), ids=repr)
def test_closed_form_rdp_equals_dp_accountings(event) -> None:
    ours, ref = event_rdp(event), reference(twin(event))
    assert ours.shape == ref.shape == (len(ORDERS),)
    assert np.all(np.isfinite(ours)) and np.all(ours >= 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-300)


def test_laplace_rdp_is_stable_at_the_extremes() -> None:
    """Large α with tiny b: no overflow, and D_α ≤ ε (pure DP bounds every order); huge b:
    D_α ≈ α·ε²/2, not 0 and not a rounding error's sign."""
    sharp = event_rdp(LaplaceDpEvent(1e-4))  # ε = 10⁴, α up to 1024
    assert np.all(np.isfinite(sharp)) and np.all(sharp <= 1e4) and sharp[-1] > 0.99e4
    assert np.all(np.diff(sharp) >= 0)  # Rényi divergences grow with α
    flat = event_rdp(LaplaceDpEvent(1e6))  # ε = 10⁻⁶
    approx = np.array(ORDERS) * 1e-12 / 2
    np.testing.assert_allclose(flat, approx, rtol=1e-3)


def test_mixed_trees_use_dp_accounting_only_for_dp_sgd() -> None:
    """A training run's event (Poisson-subsampled Gaussian) beside closed-form ones: the
    closed-form parts and dp-accounting's part add up to dp-accounting's whole."""
    run = opacus_event([(1.1, 0.01, 1000)])
    mixed = ComposedDpEvent([laplace_event(0.2), run, SelfComposedDpEvent(run, 2)])
    np.testing.assert_allclose(event_rdp(mixed), reference(twin(mixed)), rtol=1e-12)
    # dp-accounting's composition around closed-form events (the coordinator builds those)
    outer = dpa.ComposedDpEvent([laplace_event(0.2), gaussian_event(3.0)])
    np.testing.assert_allclose(event_rdp(outer), reference(dpa.ComposedDpEvent(
        [dpa.LaplaceDpEvent(5.0), dpa.GaussianDpEvent(3.0)])), rtol=1e-12)


@pytest.mark.parametrize("event", singles() + composed(), ids=repr)
def test_json_is_dp_accountings(event) -> None:
    ref = twin(event)
    assert event_to_dict(event) == event_to_dict(ref)
    assert event_key(event) == event_key(ref)
    # what a ledger stored (from either) reads back as the closed-form event, same RDP
    back = event_from_dict(json.loads(json.dumps(event_to_dict(ref))))
    assert back == event and type(back) is type(event)
    np.testing.assert_array_equal(event_rdp(back), event_rdp(event))


def test_stored_dp_accounting_json_still_reads() -> None:
    """Ledgers written before the closed forms hold dp-accounting's JSON, e.g. a node's plan
    of two partials and a training run; both read, the DP-SGD one as dp-accounting's."""
    plan = ('{"events":[{"noise_multiplier":4.0,"type":"LaplaceDpEvent"},'
            '{"noise_multiplier":4.0,"type":"LaplaceDpEvent"}],"type":"ComposedDpEvent"}')
    event = event_from_dict(json.loads(plan))
    assert event == ComposedDpEvent([LaplaceDpEvent(4.0), LaplaceDpEvent(4.0)])
    assert event_key(event) == plan
    sgd = event_from_dict(event_to_dict(opacus_event([(1.0, 0.02, 10)])))
    assert isinstance(sgd, dpa.ComposedDpEvent)
    assert event_to_dict(sgd) == event_to_dict(opacus_event([(1.0, 0.02, 10)]))


def test_pld_reports_take_the_closed_form_events() -> None:
    events = [laplace_event(0.1)] * 20 + [gaussian_event(5.0)]
    ref = [twin(e) for e in events]
    assert pld_epsilon(events, 1e-6) == pytest.approx(pld_epsilon(ref, 1e-6), rel=1e-12)
    totals = RdpTotals()
    for e in events:
        totals.add(e)
    acc = RdpAccountant(orders=ORDERS)
    acc.compose(dpa.ComposedDpEvent(ref))
    assert totals.epsilon(1e-6) == pytest.approx(acc.get_epsilon(1e-6), rel=1e-12)


@pytest.mark.parametrize("bad", [
    {"type": "LaplaceDpEvent", "noise_multiplier": 0.0},
    {"type": "LaplaceDpEvent", "noise_multiplier": -1.0},
    {"type": "LaplaceDpEvent", "noise_multiplier": math.nan},
    {"type": "GaussianDpEvent", "noise_multiplier": -0.5},
    {"type": "ZCDpEvent", "rho": -1.0, "xi": 0.0},
    {"type": "SelfComposedDpEvent", "count": -2,
     "event": {"type": "LaplaceDpEvent", "noise_multiplier": 1.0}},
    {"type": "SelfComposedDpEvent", "count": 1.5,
     "event": {"type": "LaplaceDpEvent", "noise_multiplier": 1.0}},
])
def test_invalid_events_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        event_rdp(event_from_dict(bad))


def test_gaussian_without_noise_is_infinite_as_in_dp_accounting() -> None:
    assert np.all(np.isinf(event_rdp(GaussianDpEvent(0.0))))
    assert np.all(np.isinf(reference(dpa.GaussianDpEvent(0.0))))
