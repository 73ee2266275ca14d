"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning by blocked Optimal Brain Surgeon updates.

Paper notation: W [rows, cols], H = X X^T + λI, H^{-1} = U^T U with U upper triangular, d_j = U_jj.
Columns are processed left to right in blocks of B (`cfg.blocksize`). In each block the mask is chosen once
from the saliency w_ij^2 / d_j^2 of the block's current weights, pruning exactly the block's share of the
pruned count (`block_prune_count`): by default (scope "matrix", as the paper and llm-compressor) the lowest
saliencies of the block over all rows, with scope "row" the same share in every row. For N:M the mask is
chosen every M columns from their current weights. Then, column by column, the pruned weights are zeroed and
their error e_j = (w_j - ŵ_j) / d_j is compensated on the later columns (OBS update). The sweep itself, its
fast blocked formulation and the loss from the OBS identity are in `rac.pruners.obs`.

Joint mode (the paper's sparse + quantized variant): with `cfg.quant` set, the same sweep also rounds every
kept weight onto the quantization grid (GPTQ's target, see `rac.pruners.gptq`), so the pruned weights are
exactly 0, the kept ones lie on the grid and the error of both is compensated in one pass.
"""

from __future__ import annotations

import time

from torch import Tensor

from rac.pruners.base import PruneConfig, PruneResult, factor_with_damping, make_result
from rac.pruners.gptq import quantized_obs
from rac.pruners.obs import obs_sweep, prepare, reverse_cholesky

__all__ = ["reverse_cholesky", "sparsegpt"]


def sparsegpt(W: Tensor, H: Tensor, cfg: PruneConfig) -> PruneResult:
    """Prune W [rows, cols] given H [cols, cols]; unstructured (per matrix block or per row) or N:M; with
    `cfg.quant` also quantize the kept weights in the same sweep (joint mode)."""
    if cfg.quant is not None:
        return quantized_obs(W, H, cfg, "sparsegpt")
    start = time.perf_counter()
    W0_t, Hf, dead = prepare(W, H, cfg)
    (R, lam), damp, retries = factor_with_damping(Hf, cfg, reverse_cholesky)
    W_hat_t, keep_t, err_sq, delta_sq = obs_sweep(W0_t, R, cfg)
    info = {"dead_columns": int(dead.sum()), "lambda": lam}
    loss = err_sq - lam * delta_sq  # tr(ΔW (H+λI) ΔW^T) - λ ||ΔW||^2
    return make_result(
        "sparsegpt", W, W_hat_t.T.contiguous(), keep_t.T.contiguous(), None, start, damp, retries, info, loss
    )
