"""OWL (Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity"): non-uniform per-layer sparsity from
the share of outlier Wanda scores in each decoder layer, as pure functions, and its config.

Layer outlier distribution. For decoder layer l with pruned linears W^(1..k) [out, in] and, for each, the
second moment of its input over the calibration tokens, diag(XᵀX)_j = sum_t w_t x_tj² (w_t the segment
weight of token t, as in H = sum_s w_s H_s), the Wanda score of a weight is A_ij = |W_ij| · ||X_j||_2 with
||X_j||_2 = sqrt(diag(XᵀX)_j). Over all scores of the layer's linears (concatenated, as the reference code
does) with mean Ā,

    D_l = #{A_ij > M · Ā} / #{A_ij}                                            (`outlier_ratio`)

the share of outliers (M = 5 by default). Scaling every input norm of a layer by one constant (a mean over
tokens instead of a sum, a common segment weight) scales Ā and every A_ij alike, so D_l is unchanged.

Sparsities. The paper sets S_l = 1 - D_l "constrained to [S - λ, S + λ]" with mean S; its code (luuyin/OWL
`prune_wanda_outlier`, and llm-compressor's `owl_m`/`owl_lmbda`) does it by min-max scaling the ratios onto
[0, 2λ] and centring them on the target density 1 - S:

    n_l = 2λ (D_l - min D) / (max D - min D),      S_l = 1 - (n_l - mean(n) + 1 - S) = S + mean(n) - n_l

(`owl_sparsities`). So mean(S_l) = S exactly (up to float rounding), max S - min S = 2λ, more outliers mean
lower sparsity, and every S_l lies in [S - 2λ, S + 2λ] (inside [S - λ, S + λ] only when mean(n) = λ, i.e. for
ratios symmetric about their mid-range). Equal ratios (or one layer) give S_l = S. The defaults are the
paper's LLaMA settings M = 5, λ = 0.08.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import model_validator
from torch import Tensor

from rac.config import StageConfig

DEFAULT_M = 5.0
DEFAULT_LAM = 0.08
SCORE_ROWS = 1024  # rows of a weight scored at a time (bounds the float32 workspace)


class AllocationConfig(StageConfig):
    """How the target sparsity is spread over decoder layers: `uniform` (every layer at the target) or
    `owl` (per-layer from the dense model's outlier ratios, threshold `M`, spread `lam`; see module doc)."""

    kind: Literal["uniform", "owl"] = "uniform"
    M: float = DEFAULT_M
    lam: float = DEFAULT_LAM

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data  # `allocation: owl`

    @model_validator(mode="after")
    def _valid(self) -> AllocationConfig:
        if not (math.isfinite(self.M) and self.M > 0):
            raise ValueError(f"allocation.M must be finite and > 0, got {self.M!r}")
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"allocation.lam must be finite and > 0, got {self.lam!r}")
        if self.kind == "uniform" and (self.M, self.lam) != (DEFAULT_M, DEFAULT_LAM):
            raise ValueError(f"allocation M={self.M} / lam={self.lam} apply to kind 'owl' only, got kind 'uniform'")
        return self

    @property
    def label(self) -> str:
        """Suffix for a pruned model's label: '' (uniform), 'owl' (defaults) or e.g. 'owl-m7-l0.1'."""
        if self.kind == "uniform":
            return ""
        if (self.M, self.lam) == (DEFAULT_M, DEFAULT_LAM):
            return "owl"
        return f"owl-m{self.M:g}-l{self.lam:g}"


def check_owl_range(target: float, lam: float) -> None:
    """ValueError unless every OWL sparsity can stay in [0, 1): target - 2λ >= 0 and target + 2λ < 1."""
    if not (0.0 < target < 1.0):
        raise ValueError(f"OWL needs a target sparsity in (0, 1), got {target!r}")
    if target - 2 * lam < 0 or target + 2 * lam >= 1:
        raise ValueError(f"OWL with lam={lam} can give layer sparsities in [{target - 2 * lam:.4g}, "
                         f"{target + 2 * lam:.4g}] around target {target}, outside [0, 1): use lam <= "
                         f"{min(target, 1 - target) / 2:.4g}")


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> tuple[float, ...]:
    """Per-layer sparsities S + mean(n) - n_l with n_l = 2λ (D_l - min D) / (max D - min D) (module doc)."""
    d = [float(r) for r in ratios]
    if not d:
        raise ValueError("owl_sparsities needs at least one layer ratio, got none")
    bad = [r for r in d if not (math.isfinite(r) and r >= 0)]
    if bad:
        raise ValueError(f"outlier ratios must be finite and >= 0, got {bad[0]!r}")
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be finite and > 0, got {lam!r}")
    check_owl_range(target, lam)
    lo, hi = min(d), max(d)
    if hi == lo:
        return tuple(float(target) for _ in d)
    n = [2 * lam * (r - lo) / (hi - lo) for r in d]
    mean_n = math.fsum(n) / len(n)
    return tuple(target + mean_n - x for x in n)


def _scores(W: Tensor, diag: Tensor, r0: int, r1: int) -> Tensor:
    """Wanda scores |W_ij| sqrt(diag_j) of rows r0:r1, float32 # [r1 - r0, in]."""
    return W[r0:r1].float().abs() * diag.float().clamp_min(0.0).sqrt()[None, :]


def outlier_ratio(weights: Sequence[Tensor], diags: Sequence[Tensor], M: float = DEFAULT_M) -> float:
    """D_l = share of the layer's Wanda scores A_ij = |W_ij| sqrt(diag_j) above M times their mean.

    `weights[k]` [out_k, in_k] with `diags[k]` [in_k] = diag(XᵀX) of its input (>= 0). Two streamed passes
    (rows in chunks of SCORE_ROWS): the float64 sum for the mean, then the count above the threshold."""
    if len(weights) != len(diags) or not weights:
        raise ValueError(f"outlier_ratio needs one diag per weight and at least one, got {len(weights)} "
                         f"weights and {len(diags)} diags")
    if not (math.isfinite(M) and M > 0):
        raise ValueError(f"M must be finite and > 0, got {M!r}")
    for k, (W, dg) in enumerate(zip(weights, diags, strict=True)):
        if W.dim() != 2 or dg.shape != (W.shape[1],):
            raise ValueError(f"weight {k}: diag must be [{W.shape[-1]}] for W {tuple(W.shape)}, got {tuple(dg.shape)}")
        if not bool(torch.isfinite(dg).all()) or bool((dg < 0).any()):
            raise ValueError(f"weight {k}: diag(XᵀX) must be finite and >= 0, got minimum {float(dg.min())}")
    total, count = 0.0, 0
    for W, dg in zip(weights, diags, strict=True):
        for r0 in range(0, W.shape[0], SCORE_ROWS):
            total += float(_scores(W, dg, r0, r0 + SCORE_ROWS).sum(dtype=torch.float64))
        count += W.numel()
    threshold = M * total / count
    above = 0
    for W, dg in zip(weights, diags, strict=True):
        for r0 in range(0, W.shape[0], SCORE_ROWS):
            above += int((_scores(W, dg, r0, r0 + SCORE_ROWS) > threshold).sum())
    return above / count
