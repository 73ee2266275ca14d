"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

The column norms come from the input second moment: ||X_j||_2 = sqrt(H_jj)
(`HessianAccumulator.col_norms`, or `col_norms_from_hessian`). There is no weight update.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from rac.pruners.base import PruneConfig, PruneResult, check_col_norms, check_layer, make_result
from rac.pruners.masks import make_mask


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
