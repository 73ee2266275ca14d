"""Power of a paired accuracy comparison: the smallest difference an evaluation design can resolve.

Design. Two models A and B answer the same problems, grouped into `n_clusters` clusters (a GSM8K problem and
its template variants) of `problems` problems each, with `samples` generations per problem. X^A, X^B in {0, 1}
are the correctness of one generation. The statistic is the paired mean difference of the per-problem pass
rates, averaged over problems, with its interval from resampling whole clusters (`rac.eval.evaluate`,
`rac.reporting.compare`); for equal cluster sizes that mean is the mean of the n cluster means D_c.

Assumptions (stated as parameters):
  * B's accuracy is `accuracy` = p_B and A's is p_A = p_B + δ (marginally, every generation);
  * `corr` = ρ = Corr(X^A, X^B) for the two models' generations on the same problem (their paired correlation;
    models pruned from one dense model agree on which problems are easy, so ρ > 0 is typical);
  * `icc` = r = the correlation between the per-generation differences X^A - X^B of two different
    (problem, sample) slots of one cluster (r = 0: every slot is new information, r = 1: a cluster is one slot).

Derivation. Per slot, v(δ) = Var(X^A - X^B) = σ_A² + σ_B² - 2ρ σ_A σ_B with σ² = p(1 - p). The mean of the
K = problems · samples slots of a cluster has Var(D_c) = v (r + (1 - r) / K) (K variances and K(K-1) covariances
r·v, over K²), and the estimate over n independent clusters has SE(δ) = sqrt(Var(D_c) / n). A two-sided level-α
test (or a 1 - α interval excluding 0) of a true difference δ has, by the normal approximation,
power(δ) = Φ(δ / SE(δ) - z_{1-α/2}) (the opposite tail, Φ(-δ/SE - z), is negligible and left out), so the
smallest resolvable difference solves δ = (z_{1-α/2} + z_power) · SE(δ). SE depends on δ through σ_A, so the
equation is solved on (0, 1 - p_B]: a grid scan finds the first grid point resolved, then bisection inside
the grid step before it; when no δ up to 1 - p_B is resolved the answer is inf.
This treats SE as known; with few clusters the estimated SE makes the real power a little lower.
"""

from __future__ import annotations

import math
from statistics import NormalDist

_SCAN_POINTS = 1000  # grid for the first sign change of δ - z·SE(δ) (SE need not be monotone in δ)
_BISECT_STEPS = 60


def _check(n_clusters: int, accuracy: float, corr: float, problems: int, samples: int, icc: float,
           alpha: float, power: float) -> None:
    for name, v in (("n_clusters", n_clusters), ("problems", problems), ("samples", samples)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (0.0 <= accuracy < 1.0):
        raise ValueError(f"accuracy (the baseline model's) must be in [0, 1), got {accuracy!r}")
    if not (-1.0 <= corr <= 1.0):
        raise ValueError(f"corr must be in [-1, 1], got {corr!r}")
    if not (0.0 <= icc <= 1.0):
        raise ValueError(f"icc must be in [0, 1], got {icc!r}")
    for name, prob in (("alpha", alpha), ("power", power)):
        if not (0.0 < prob < 1.0):
            raise ValueError(f"{name} must be in (0, 1), got {prob!r}")


def difference_se(delta: float, n_clusters: int, accuracy: float, corr: float = 0.0, problems: int = 1,
                  samples: int = 1, icc: float = 0.0) -> float:
    """SE(δ) = sqrt(v(δ) (r + (1 - r) / K) / n) of the paired mean difference (module docstring)."""
    _check(n_clusters, accuracy, corr, problems, samples, icc, 0.05, 0.8)
    p_a = accuracy + delta
    if not (0.0 <= p_a <= 1.0):
        raise ValueError(f"accuracy + delta = {p_a!r} is not a probability (accuracy={accuracy}, delta={delta})")
    s_a, s_b = math.sqrt(p_a * (1 - p_a)), math.sqrt(accuracy * (1 - accuracy))
    v = s_a**2 + s_b**2 - 2 * corr * s_a * s_b  # Var(X^A - X^B) of one slot
    k = problems * samples
    return math.sqrt(max(v, 0.0) * (icc + (1 - icc) / k) / n_clusters)


def paired_power(delta: float, n_clusters: int, accuracy: float, corr: float = 0.0, problems: int = 1,
                 samples: int = 1, icc: float = 0.0, alpha: float = 0.05) -> float:
    """Power Φ(δ / SE(δ) - z_{1-α/2}) to resolve a true difference δ > 0 (1.0 when SE = 0)."""
    _check(n_clusters, accuracy, corr, problems, samples, icc, alpha, 0.8)
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta!r}")
    se = difference_se(delta, n_clusters, accuracy, corr, problems, samples, icc)
    if se == 0.0:
        return 1.0
    return NormalDist().cdf(delta / se - NormalDist().inv_cdf(1 - alpha / 2))


def min_detectable_difference(n_clusters: int, accuracy: float, corr: float = 0.0, problems: int = 1,
                              samples: int = 1, icc: float = 0.0, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """The smallest δ with paired_power(δ) = `power`: δ = (z_{1-α/2} + z_power) · SE(δ) (scan, then bisection).

    E.g. 57 clusters of 3 problems, 1 greedy sample, baseline accuracy 0.1, ρ = 0.4, r = 0.5. Returns inf
    when no δ up to 1 - accuracy reaches `power`."""
    _check(n_clusters, accuracy, corr, problems, samples, icc, alpha, power)
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)

    def gap(d: float) -> float:  # < 0: d not yet resolved
        return d - z * difference_se(d, n_clusters, accuracy, corr, problems, samples, icc)

    top = 1.0 - accuracy
    grid = [top * (i + 1) / _SCAN_POINTS for i in range(_SCAN_POINTS)]
    first = next((d for d in grid if gap(d) >= 0), None)  # the first grid point resolved
    if first is None:
        return math.inf
    lo, hi = first - top / _SCAN_POINTS, first
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return hi
