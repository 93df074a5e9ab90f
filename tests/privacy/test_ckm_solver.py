"""The cell key method's table generator without scipy (a node builds its table at start).

scipy's least squares was the reference solver of the maximum-entropy law; it stays a test
dependency only, to check the Newton solver that replaced it.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import least_squares

from privacy import _ckm


def scipy_maxent(support: np.ndarray, variance: float) -> np.ndarray:
    """The former solver, verbatim."""
    def probs(theta: np.ndarray) -> np.ndarray:
        z = theta[0] * support + theta[1] * support**2
        w = np.exp(z - z.max())
        return w / w.sum()

    def residual(theta: np.ndarray) -> np.ndarray:
        p = probs(theta)
        return np.array([p @ support, p @ support**2 - variance])

    fit = least_squares(residual, x0=np.zeros(2), xtol=1e-14, ftol=1e-14, gtol=1e-14)
    return probs(fit.x)


@pytest.mark.parametrize("high", [1, 2, 3, 4, 5, 8, 20, 50])
def test_newton_finds_scipys_law(high: int) -> None:
    for low in range(-high, 0):
        support = np.arange(low, high + 1).astype(float)
        for variance in (0.05, 0.5, 1.0, 3.0, 0.9 * -low * high):
            if not 0 < variance < -low * high:
                continue
            ours = _ckm._maxent(support, variance)
            np.testing.assert_allclose(ours, scipy_maxent(support, variance), atol=1e-9)
            assert abs(ours @ support) < 1e-10
            assert ours @ support**2 == pytest.approx(variance, rel=1e-10)


@pytest.mark.parametrize(("d", "v"), [(4, 3.0), (2, 1.0), (10, 20.0), (3, 8.9), (6, 5.0)])
def test_generated_tables_are_unchanged(monkeypatch, d: int, v: float) -> None:
    """Same table as with scipy's solver (the default and other parameters), so a node's
    released values do not change with the upgrade. Exception: parameters whose rounding
    meets an exact tie between x and −x (a symmetric row; 3 of 55 (D, V) pairs tried, e.g.
    (2, 0.5), (3, 2.25), (5, 2.0)) may get the mirror-image row, as valid (mean 0, same
    variance): scipy's last bits used to break those ties."""
    _ckm.generate_ptable.cache_clear()
    ours = _ckm.generate_ptable(d, v)
    monkeypatch.setattr(_ckm, "_maxent", scipy_maxent)
    _ckm.generate_ptable.cache_clear()
    try:
        np.testing.assert_array_equal(ours, _ckm.generate_ptable(d, v))
    finally:
        _ckm.generate_ptable.cache_clear()
