"""rac.compare: paired bootstrap intervals against exact enumeration of the resampling distribution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rac.compare import paired_difference


def exact_bootstrap_quantiles(d: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Quantiles of the mean over every one of the P^P equally likely resamples (brute force)."""
    means = np.array([d[list(ix)].mean() for ix in itertools.product(range(d.size), repeat=d.size)])
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def test_paired_difference_matches_exact_bootstrap() -> None:
    a = np.array([1.0, 1.0, 0.0, 1.0, 0.5, 1.0])
    b = np.array([0.0, 1.0, 0.0, 0.0, 0.5, 1.0])
    diff, lo, hi = paired_difference(a, b, n_boot=200_000, seed=1)
    ex_lo, ex_hi = exact_bootstrap_quantiles(a - b)
    assert diff == pytest.approx(0.5 / 3 + 1 / 6)  # mean of [1, 0, 0, 1, 0, 0]
    assert lo == pytest.approx(ex_lo, abs=0.02) and hi == pytest.approx(ex_hi, abs=0.02)


def test_pairing_is_tighter_than_two_separate_intervals() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(float)
    treat = base.copy()
    treat[rng.choice(200, 12, replace=False)] = 1.0  # a few extra problems solved, the rest identical
    diff, lo, hi = paired_difference(treat, base, n_boot=5000)
    sep = 1.96 * np.sqrt(treat.var() / 200 + base.var() / 200)  # unpaired normal half-width
    assert lo > 0 and (hi - lo) / 2 < sep / 2


def test_paired_difference_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        paired_difference(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference(np.ones(0), np.ones(0))
