"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

The column norms come from the input second moment: ||X_j||_2 = sqrt(H_jj)
(`HessianAccumulator.col_norms`, or `col_norms_from_hessian`). There is no weight update.

`prune_diag` runs Wanda or magnitude from diag H alone (`rac.pruners.stats.DiagAccumulator`): the same masks
as from the full H, with the loss reported under diag H, tr(dW diag(H) dW^T) = sum_ij dW_ij^2 H_jj, the
quantity Wanda's score minimises row by row (`diag_energy` is tr(W diag(H) W^T)).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import Tensor

from rac.pruners.base import PruneConfig, PruneResult, check_col_norms, check_layer, make_result
from rac.pruners.magnitude import magnitude
from rac.pruners.masks import make_mask

DIAG_METHODS = ("wanda", "magnitude")  # pruners whose result reads nothing of H but its diagonal


def col_norms_from_hessian(H: Tensor) -> Tensor:
    """||X_j||_2 = sqrt(H_jj) [in]; raises ValueError on a negative diagonal."""
    diag = torch.diagonal(H).float()  # [in]
    if bool((diag < 0).any()):
        raise ValueError(f"H has a negative diagonal entry (min {float(diag.min())}); not a second moment")
    return diag.sqrt()


def wanda(W: Tensor, col_norms: Tensor, cfg: PruneConfig, H: Tensor | None = None) -> PruneResult:
    """Keep the weights with the largest |W_ij| * col_norms[j] per row (or N:M groups)."""
    start = time.perf_counter()
    check_layer(W, H, cfg)
    check_col_norms(col_norms, W.shape[1])
    Wf = W.detach().float()  # [out, in]
    scores = Wf.abs() * col_norms.float()[None, :]  # [out, in]
    mask = make_mask(scores, cfg.target_sparsity, cfg.nm, cfg.scope)  # [out, in] bool
    return make_result("wanda", W, Wf * mask, mask, H, start)


def diag_energy(W: Tensor, h_diag: Tensor) -> float:
    """tr(W diag(h) W^T) = sum_ij W_ij^2 h_j for W [out, in], h [in] (float32 products, float64 sum)."""
    return float((W.float().square() * h_diag.float()[None, :]).sum(dtype=torch.float64))


def prune_diag(W: Tensor, h_diag: Tensor, cfg: PruneConfig) -> PruneResult:
    """Wanda or magnitude (`cfg.method`) from the diagonal h [in] of H alone; `loss` = tr(dW diag(h) dW^T)."""
    if cfg.method not in DIAG_METHODS:
        raise ValueError(f"method {cfg.method!r} needs the full H; diagonal statistics serve {list(DIAG_METHODS)}")
    if h_diag.dim() != 1 or h_diag.shape[0] != W.shape[1]:
        raise ValueError(f"diag H must be [{W.shape[1]}], got {list(h_diag.shape)}")
    if not bool(torch.isfinite(h_diag).all()) or bool((h_diag < 0).any()):
        raise ValueError("diag H must be finite and >= 0 (a sum of squares)")
    res = wanda(W, h_diag.float().sqrt(), cfg) if cfg.method == "wanda" else magnitude(W, cfg)
    return replace(res, loss=diag_energy(W.float() - res.weight.float(), h_diag))
