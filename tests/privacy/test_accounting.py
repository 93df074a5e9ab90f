from __future__ import annotations

import dp_accounting as dpa
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from privacy import (
    RdpTotals,
    aggregate_event,
    event_from_dict,
    event_to_dict,
    gaussian_event,
    gaussian_sigma,
    laplace_event,
    opacus_event,
    pld_epsilon,
    rdp_epsilon,
    report_epsilon,
)
from privacy._accounting import ORDERS

DELTA = 1e-5


def cross_check_events() -> list[dpa.DpEvent]:
    # 100 Laplace(ε = 0.1) releases + one DP-SGD run (σ = 1.1, q = 0.01, 1,000 steps).
    return [laplace_event(0.1)] * 100 + [opacus_event([(1.1, 0.01, 1000)])]


def test_cross_check_against_dp_accounting() -> None:
    events = cross_check_events()
    totals = RdpTotals()
    for e in events:
        totals.add(e)
    ours_rdp, ours_pld = totals.epsilon(DELTA), pld_epsilon(events, DELTA)

    # the reference in dp-accounting's own events (ours are closed-form twins: test_events)
    ref_rdp = RdpAccountant()
    ref_rdp.compose(dpa.ComposedDpEvent([dpa.LaplaceDpEvent(10.0)] * 100 + events[-1:]))
    ref_pld = PLDAccountant()
    ref_pld.compose(dpa.SelfComposedDpEvent(dpa.LaplaceDpEvent(10.0), 100))
    ref_pld.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)), 1000))  # fmt: skip

    assert round(ours_rdp, 2) == round(ref_rdp.get_epsilon(DELTA), 2) == 4.92
    assert round(ours_pld, 2) == round(ref_pld.get_epsilon(DELTA), 2) == 4.57
    assert report_epsilon(events, DELTA) == (pytest.approx(ours_pld), "pld")


def test_opacus_history_with_several_entries() -> None:
    hist = [(1.1, 0.01, 600), (1.1, 0.01, 400)]
    split, joined = opacus_event(hist), opacus_event([(1.1, 0.01, 1000)])
    assert rdp_epsilon([split], DELTA) == pytest.approx(rdp_epsilon([joined], DELTA))
    with pytest.raises(ValueError):
        opacus_event([(1.1, 1.5, 10)])


def test_totals_serialise_and_check_fit() -> None:
    t = RdpTotals()
    assert t.epsilon(DELTA) == 0.0
    for _ in range(10):
        t.add(laplace_event(0.1))
    again = RdpTotals.from_list(t.to_list())
    assert again == t and len(t.to_list()) == len(ORDERS)
    eps10 = t.epsilon(DELTA)
    eps11 = t.plus(laplace_event(0.1)).epsilon(DELTA)
    assert eps10 < eps11
    assert t.would_fit(laplace_event(0.1), eps11, DELTA)
    assert not t.would_fit(laplace_event(0.1), (eps10 + eps11) / 2, DELTA)
    assert t.epsilon(DELTA) == eps10  # plus/would_fit do not mutate
    with pytest.raises(ValueError):
        RdpTotals([0.0, 1.0])


def test_event_round_trip() -> None:
    events = [
        laplace_event(0.5),
        gaussian_event(2.0),
        aggregate_event("mean", 1.0),
        aggregate_event("quantile", 1.0),
        opacus_event([(1.0, 0.02, 10), (2.0, 0.01, 5)]),
    ]
    for e in events:
        assert event_from_dict(event_to_dict(e)) == e
    with pytest.raises(ValueError):
        event_from_dict({"type": "os.system"})


def test_report_falls_back_to_rdp_for_zcdp() -> None:
    events = [laplace_event(0.5), aggregate_event("quantile", 0.5)]
    with pytest.raises(dpa.UnsupportedEventError):
        pld_epsilon(events, DELTA)
    eps, method = report_epsilon(events, DELTA)
    assert method == "rdp" and eps == pytest.approx(rdp_epsilon(events, DELTA))


def test_gaussian_event_matches_calibration() -> None:
    sigma = gaussian_sigma(1.0, 0.8, DELTA)
    # PLD is near-exact for one Gaussian: it gives back the calibrated ε.
    assert pld_epsilon([gaussian_event(sigma)], DELTA) == pytest.approx(0.8, abs=0.01)


def test_vectorised_epsilon_matches_dp_accounting() -> None:
    import numpy as np
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    events = [laplace_event(0.1), opacus_event([(1.1, 0.01, 1000)]), gaussian_event(3.0),
              aggregate_event("quantile", 0.3), laplace_event(5.0)]  # fmt: skip
    t = RdpTotals()
    for i in range(25):
        t.add(events[i % len(events)])
        for delta in (1e-3, 1e-6, 1e-10):
            ref = compute_epsilon(np.array(ORDERS), np.array(t.to_list()), delta)[0]
            assert t.epsilon(delta) == pytest.approx(ref, rel=1e-12)
