"""The DP intervals' bootstrap draws the sum of the nodes' Laplace noises as two Gamma draws
per distinct scale (federation/_merge.py::_laplace_sums): the same law as one Laplace draw
per node, checked on its moments and quantiles (fixed seeds, tolerances that can fail)."""

from __future__ import annotations

import numpy as np
import pytest

from federation._merge import _laplace_sums

N = 400_000


@pytest.mark.parametrize("scales", [[2.0], [1.0] * 30, [1.0, 3.0, 3.0, 0.0]])
def test_the_sum_of_the_nodes_laplace_noises_has_its_law(scales: list[float]) -> None:
    fast = _laplace_sums(np.random.default_rng(11), scales, N)
    rng = np.random.default_rng(12)
    direct = sum(rng.laplace(0.0, b, N) for b in scales if b > 0)
    var = 2 * sum(b * b for b in scales)  # Var Laplace(b) = 2b²
    assert fast.var() == pytest.approx(var, rel=0.02)
    assert abs(fast.mean()) < 4 * np.sqrt(var / N)
    k = sum(1 for b in scales if b > 0)  # equal scales: excess kurtosis 3/k
    if len(set(b for b in scales if b > 0)) == 1:
        kurt = ((fast - fast.mean()) ** 4).mean() / fast.var() ** 2 - 3
        assert kurt == pytest.approx(3 / k, abs=0.1)
    for q in (0.025, 0.5, 0.975):
        assert np.quantile(fast, q) == pytest.approx(np.quantile(direct, q),
                                                     abs=0.02 * np.sqrt(var))


def test_no_noise_without_a_scale() -> None:
    assert not _laplace_sums(np.random.default_rng(1), [0.0, 0.0], 10).any()
