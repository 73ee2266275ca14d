"""Magnitude pruning: drop the weights of smallest |W_ij| (per row, per matrix, or N:M)."""

from __future__ import annotations

import time

from torch import Tensor

from rac.pruners.base import PruneConfig, PruneResult, check_layer, make_result
from rac.pruners.masks import make_mask


def magnitude(W: Tensor, cfg: PruneConfig, H: Tensor | None = None) -> PruneResult:
    """Keep the largest |W_ij|; no weight update. H, when given, is only used to report the loss."""
    start = time.perf_counter()
    check_layer(W, H, cfg)
    Wf = W.detach().float()  # [out, in]
    mask = make_mask(Wf.abs(), cfg.target_sparsity, cfg.nm, cfg.scope)  # [out, in] bool
    return make_result("magnitude", W, Wf * mask, mask, H, start)
