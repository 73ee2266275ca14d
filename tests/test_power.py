"""The design-power formulas of rac.eval.power against a simulation of the design they describe."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rac.eval.evaluate import bootstrap_interval
from rac.eval.power import difference_se, min_detectable_difference, paired_power

Z975 = 1.959963984540054


def simulate(n_sims: int, n_clusters: int, p_b: float, delta: float, corr: float, problems: int, samples: int,
             icc: float, seed: int) -> np.ndarray:
    """Per-cluster mean differences D_c [n_sims, n_clusters, problems] (pass-rate differences per problem).

    Each (problem, sample) slot's pair (X^A, X^B) has marginals p_b + delta, p_b and correlation `corr`
    (drawn from the 2x2 joint). Within a cluster a slot copies the cluster's own pair with probability
    sqrt(icc), else draws a fresh one: two slots' differences then correlate exactly icc."""
    rng = np.random.default_rng(seed)
    p_a = p_b + delta
    s_a, s_b = math.sqrt(p_a * (1 - p_a)), math.sqrt(p_b * (1 - p_b))
    p11 = p_a * p_b + corr * s_a * s_b
    joint = np.array([p11, p_a - p11, p_b - p11, 1 - p_a - p_b + p11])  # (1,1) (1,0) (0,1) (0,0)
    assert (joint >= 0).all(), joint
    diffs = np.array([0, 1, -1, 0])  # X^A - X^B of each cell

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        return diffs[rng.choice(4, size=shape, p=joint)]

    k = (n_sims, n_clusters, problems, samples)
    own = draw((n_sims, n_clusters, 1, 1))
    fresh = draw(k)
    copy = rng.random(k) < math.sqrt(icc)
    slot = np.where(copy, own, fresh)  # [S, n, problems, samples]
    return slot.mean(axis=3)  # per-problem difference of pass rates


def test_se_formula_matches_the_simulated_variance() -> None:
    n, p, d, rho, m, k, r = 40, 0.3, 0.1, 0.4, 3, 2, 0.3
    per_problem = simulate(20_000, n, p, d, rho, m, k, r, seed=0)
    estimates = per_problem.mean(axis=(1, 2))  # the paired mean difference of each simulated evaluation
    assert estimates.mean() == pytest.approx(d, abs=0.002)
    assert estimates.std() == pytest.approx(difference_se(d, n, p, rho, m, k, r), rel=0.02)


def test_se_limits() -> None:
    base = difference_se(0.1, 50, 0.3, 0.2)
    assert difference_se(0.1, 50, 0.3, 0.2, problems=4) == pytest.approx(base / 2)  # r = 0: 4x the slots
    assert difference_se(0.1, 50, 0.3, 0.2, problems=4, icc=1.0) == pytest.approx(base)  # r = 1: no gain
    assert difference_se(0.1, 200, 0.3, 0.2) == pytest.approx(base / 2)  # 4x the clusters
    s_a, s_b = math.sqrt(0.4 * 0.6), math.sqrt(0.3 * 0.7)
    assert base == pytest.approx(math.sqrt((s_a**2 + s_b**2 - 0.4 * s_a * s_b) / 50))


@pytest.mark.parametrize("n,p,rho,m,k,r", [(100, 0.3, 0.4, 2, 3, 0.25), (57, 0.15, 0.3, 3, 1, 0.5)])
def test_power_at_the_mdd_is_the_target_in_simulation(n: int, p: float, rho: float, m: int, k: int,
                                                      r: float) -> None:
    """At δ = min_detectable_difference, a level-0.05 test with the estimated cluster SE rejects ~80%."""
    d = min_detectable_difference(n, p, rho, m, k, r)
    assert paired_power(d, n, p, rho, m, k, r) == pytest.approx(0.8, abs=1e-9)
    cluster = simulate(6000, n, p, d, rho, m, k, r, seed=1).mean(axis=2)  # D_c [S, n]
    est, se = cluster.mean(axis=1), cluster.std(axis=1, ddof=1) / math.sqrt(n)
    rejected = np.mean(np.abs(est) / se > Z975)
    assert rejected == pytest.approx(0.8, abs=0.03)  # SE of the simulated power ~0.005; t vs z ~0.01
    half = simulate(6000, n, p, d / 2, rho, m, k, r, seed=2).mean(axis=2)
    est, se = half.mean(axis=1), half.std(axis=1, ddof=1) / math.sqrt(n)
    assert np.mean(np.abs(est) / se > Z975) == pytest.approx(paired_power(d / 2, n, p, rho, m, k, r), abs=0.04)


def test_power_through_rac_cluster_bootstrap_interval() -> None:
    """The interval rac reports (percentile bootstrap over clusters) excludes 0 about 80% of the time at the mdd."""
    n, p, rho, m, r = 60, 0.2, 0.3, 3, 0.4
    d = min_detectable_difference(n, p, rho, m, 1, r)
    sims = simulate(400, n, p, d, rho, m, 1, r, seed=3)  # [S, n, m]
    groups = np.repeat(np.arange(n), m)
    hits = 0
    for s, per_problem in enumerate(sims):
        lo, hi = bootstrap_interval(per_problem.reshape(-1), 1000, seed=s, groups=groups)
        hits += lo > 0 or hi < 0
    assert hits / len(sims) == pytest.approx(0.8, abs=0.08)  # 400 simulations: SE 0.02


def test_mdd_behaviour_and_bad_inputs() -> None:
    assert min_detectable_difference(400, 0.3) < min_detectable_difference(100, 0.3)
    assert min_detectable_difference(100, 0.3, corr=0.6) < min_detectable_difference(100, 0.3, corr=0.0)
    assert min_detectable_difference(100, 0.3, power=0.9) > min_detectable_difference(100, 0.3)
    assert min_detectable_difference(2, 0.5, corr=-1.0) == math.inf  # nothing up to accuracy 1 resolves
    for kwargs, msg in [({"n_clusters": 0}, "n_clusters must be an integer >= 1, got 0"),
                        ({"accuracy": 1.0}, "accuracy .* must be in \\[0, 1\\), got 1.0"),
                        ({"corr": 1.5}, "corr must be in \\[-1, 1\\], got 1.5"),
                        ({"icc": -0.1}, "icc must be in \\[0, 1\\], got -0.1"),
                        ({"alpha": 0.0}, "alpha must be in \\(0, 1\\), got 0.0")]:
        args = {"n_clusters": 10, "accuracy": 0.3, **kwargs}
        with pytest.raises(ValueError, match=msg):
            min_detectable_difference(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accuracy \\+ delta = 1.2"):
        difference_se(0.9, 10, 0.3)
    with pytest.raises(ValueError, match="delta must be > 0, got 0.0"):
        paired_power(0.0, 10, 0.3)
