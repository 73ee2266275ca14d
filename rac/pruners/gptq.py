"""GPTQ (Frantar et al. 2023): one-shot weight quantization by the same blocked OBS sweep as SparseGPT.

Problem: min_Ŵ tr((W - Ŵ) H (W - Ŵ)^T) with every row of Ŵ on the symmetric integer grid of `rac.pruners.quant`
(ŵ_ij = s_ig q_ij, q_ij in [-q_max - 1, q_max]). Optimal Brain Quantization rounds one weight at a time and
moves the not yet quantized ones by the OBS update δ = -(w_q - ŵ_q) / [H^-1]_qq · H^-1_{:,q}; GPTQ quantizes
all rows in one fixed column order, where with H^-1 = U^T U (U upper triangular, d_j = U_jj) the update after
column j is w_k -= U_jk (w_j - ŵ_j) / d_j for the later columns k. That is the sweep of `rac.pruners.obs` with
the target "round onto the grid" (ŵ_j = s_g clamp(round(w_j / s_g))) instead of "zero"; its blocked
formulation, damping (λ = damp * mean diag H, grown on failure), dead inputs and the loss from the OBS identity
(||E||^2 - λ ||ΔW||^2, undamped) are shared with SparseGPT.

Scales: s = max |w| / d over a group, d = q_max or q_max + 1/2 by `QuantSpec.grid` (see `rac.pruners.quant`).
Without act order and `scales` "sweep" (the default; GPTQ's usual choice, `static_groups=False`): with groups
of `group_size` consecutive columns, the scales of a group are those of the group's current weights, i.e.
after the error updates of all earlier columns, taken when the sweep reaches the group's first column (the
reference code reads them with the updates of the group's own block still pending when a group starts inside
a block; here the group is brought up to date first; the two agree when groups and blocks coincide). A group
always lies inside one block (`blocksize` is a multiple of `group_size`). With `scales` "static"
(llm-compressor's GPTQ) every group's scales come from the original weights (dead inputs zeroed) before the
sweep. Per channel (group_size None) the scales are those of the original weights, fixed before the sweep, as
in the reference.

Activation order (`act_order`, see `rac.pruners.quant`): columns are processed in decreasing diag H (stable
sort, ties in column order), so the inputs with the most energy are quantized first and their error lands on
the less important ones. W and H are permuted, swept, and Ŵ, the codes and the mask are permuted back.
* "weight" (static groups, what vLLM serves): the groups stay the original column blocks j // group_size;
  before the sweep every group's scales are taken from the original weights (dead inputs zeroed), as GPTQ's
  `static_groups=True` and llm-compressor's ActivationOrdering.WEIGHT do; the column processed p-th is then
  rounded with the scales of its original group perm[p] // group_size. No g_idx.
* "group" (dynamic groups): groups are formed in processing order, with scales taken as without act order
  (when the sweep reaches them, or with `scales` "static" from the original weights of their columns, as
  llm-compressor's ActivationOrdering.GROUP), and `g_idx[j]` names the group of original column j (exactly
  group_size columns each).
Per channel both reduce to the same sweep (one group, original-weight scales), which is "weight".

Joint mode (`sparsegpt` with `quant`): the target is m_j ⊙ (grid rounding) with SparseGPT's mask m, chosen per
block or per M columns as in `rac.pruners.sparsegpt`; pruned codes are 0. A group's scales are taken from all
of its current weights, those about to be pruned included (the N:M masks of its later columns are not chosen
yet when it starts; the SparseGPT reference likewise takes per-channel scales from the dense weights).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from rac.pruners.base import PruneConfig, PruneResult, factor_with_damping, make_result
from rac.pruners.obs import Grid, obs_sweep, prepare, reverse_cholesky
from rac.pruners.quant import QuantizedWeight


def gptq(W: Tensor, H: Tensor, cfg: PruneConfig) -> PruneResult:
    """Quantize W [rows, cols] given H [cols, cols] onto `cfg.quant`'s grid (no pruning)."""
    if cfg.nm is not None or cfg.target_sparsity > 0:
        what = f"nm={cfg.nm[0]}:{cfg.nm[1]}" if cfg.nm is not None else f"sparsity={cfg.target_sparsity}"
        raise ValueError(f"gptq() quantizes only, but the config prunes ({what}); use sparsegpt() for the joint mode")
    return quantized_obs(W, H, cfg, "gptq")


def quantized_obs(W: Tensor, H: Tensor, cfg: PruneConfig, method: str) -> PruneResult:
    """The quantizing OBS sweep (GPTQ; joint sparse + quantized when `cfg` prunes), result named `method`."""
    spec = cfg.quant
    if spec is None:
        raise ValueError(f"method {method!r} with quantization needs cfg.quant (bits, group_size, act_order), got None")
    start = time.perf_counter()
    W0_t, Hf, dead = prepare(W, H, cfg)  # [cols, rows], [cols, cols], [cols]
    perm = act_order(Hf) if spec.act_order else None
    grid = Grid.new(W0_t, spec, perm)  # static scales from the original order
    if perm is not None:
        W0_t, Hf = W0_t[perm], Hf[perm][:, perm]
    (R, lam), damp, retries = factor_with_damping(Hf, cfg, reverse_cholesky)
    _, keep_t, err_sq, delta_sq = obs_sweep(W0_t, R, cfg, grid)
    qw = quantized_weight(grid, perm)
    keep = _unpermute(keep_t, perm).T.contiguous()  # [rows, cols]
    info: dict[str, float | int | bool | str] = {"dead_columns": int(dead.sum()), "lambda": lam, "quant": spec.label}
    loss = err_sq - lam * delta_sq  # tr(ΔW (H+λI) ΔW^T) - λ ||ΔW||^2
    return make_result(method, W, qw.dequantize(), keep, None, start, damp, retries, info, loss, quant=qw)


def act_order(H: Tensor) -> Tensor:
    """Processing order [cols] int64: decreasing diag H, ties kept in column order."""
    return torch.argsort(torch.diagonal(H), descending=True, stable=True)


def quantized_weight(grid: Grid, perm: Tensor | None) -> QuantizedWeight:
    """The sweep's codes and scales in the original column order: q [rows, cols] int8, scale [rows, n_groups],
    g_idx [cols] int32 (group of each original column) with act order "group", else None."""
    cols = grid.codes_t.shape[0]
    q = _unpermute(grid.codes_t, perm).T.to(torch.int8).contiguous()  # [rows, cols]
    scale = grid.scale_t.T.contiguous()  # [rows, n_groups]
    g_idx = None
    if perm is not None and grid.spec.has_g_idx:
        g_idx = torch.empty(cols, dtype=torch.int32, device=perm.device)
        g_idx[perm] = (torch.arange(cols, device=perm.device) // grid.width).to(torch.int32)
    return QuantizedWeight(q=q, scale=scale, g_idx=g_idx, spec=grid.spec)


def _unpermute(t: Tensor, perm: Tensor | None) -> Tensor:
    """Rows of t [cols, ...] given in processing order, back in the original column order."""
    if perm is None:
        return t
    out = torch.empty_like(t)
    out[perm] = t
    return out
