"""The blocked Optimal Brain Surgeon sweep that SparseGPT and GPTQ share: one pass over the columns of W in
which every column is replaced by its target and its error is compensated on the later columns.

Paper notation: W [rows, cols], H = X X^T + λI, H^{-1} = U^T U with U upper triangular, d_j = U_jj.
Columns are visited left to right; column j (a vector over the rows) with current value w_j gets its target

    prune        ŵ_j = m_j ⊙ w_j                           (m_j the keep mask of column j)
    quantize     ŵ_j = s_g ⊙ clamp(round(w_j / s_g))       (s_g the scales of the group g of column j)
    joint        ŵ_j = m_j ⊙ s_g ⊙ clamp(round(w_j / s_g))

then e_j = (w_j - ŵ_j) / d_j and every later column k moves by w_k -= U_jk e_j (OBS update). Summing the
updates, W - Ŵ = E U for the error matrix E [rows, cols], whatever the targets are. The mask (SparseGPT:
per block from w^2 / d^2, or per M columns) and the scales (GPTQ: per group, see `rac.pruners.gptq`) are
chosen by the callers' rules from the current weights; the sweep only needs them when it reaches them.

Fast formulation, same result as the classic per-column loop up to rounding:
* No inverse. With R upper triangular and R R^T = H (a blocked Cholesky from the bottom-right corner,
  `reverse_cholesky`), U = R^{-1}. Columns go in blocks of B (`cfg.blocksize`); the later columns C are
  updated through the block's total change δ_B = W_B - Ŵ_B by G_C += δ_B R_BC (lazy batch update), and
  block B at its start is W_B + G_B U_BB with U_BB = R_BB^{-1} ([B, B]). One Cholesky replaces the
  reference's Cholesky + inverse + Cholesky.
* The in-block sweep runs on a transposed [B, rows] tile in micro-blocks of 16 columns: rank-1 OBS
  updates stay inside the micro-block (a few torch calls per column on a small tile) and one matmul brings
  the next micro-block up to date. Quantization groups inside a block are segments: at a group's first
  column one matmul brings the whole group up to date (its scales are taken from those current weights),
  and the micro-blocks of the group then only need the updates from the group's own earlier columns.
  Static grids (per channel, act order "weight", scales "static": every scale fixed before the sweep) need no
  segments; each micro-block gathers the scales of its columns' groups.
* Loss from the OBS identity: since U (H + λI) U^T = I, tr(ΔW (H + λI) ΔW^T) = ||E||_F^2 and the undamped
  loss is ||E||^2 - λ ||ΔW||^2, with no extra [rows, cols] x [cols, cols] product.
Dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0 (`prepare`), as in the reference implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rac.pruners.base import FactorizationError, PruneConfig, check_layer, dead_columns
from rac.pruners.masks import n_pruned, prune_lowest
from rac.pruners.quant import QuantSpec, group_scales, quantize_codes

MICRO = 16  # columns per micro-block of the in-block sweep
CHOL_BLOCK = 256  # columns per block of the blocked reverse Cholesky


@dataclass(frozen=True)
class Grid:
    """What a quantizing sweep fills in: scales per group and codes per column (transposed, float32).

    Columns are in processing order. Static grids (`QuantSpec.static_groups`: per channel, act order "weight",
    scales "static") have every scale fixed from the original weights before the sweep and `col_group[p]` names
    the group of the column processed p-th; dynamic grids get a group's scales when the sweep reaches it. The
    groups are the original column blocks (col_group = perm // width), except with act order "group", where
    group k is processing positions k*width .. (k+1)*width - 1 (static or not).
    """

    spec: QuantSpec
    width: int  # columns per group (all columns per channel)
    scale_t: Tensor  # [n_groups, rows]; static: preset from the original weights
    codes_t: Tensor  # [cols, rows] codes in processing order, written column by column
    col_group: Tensor | None  # [cols] int64 group of each processing position (static grids), else None

    @classmethod
    def new(cls, W0_t: Tensor, spec: QuantSpec, perm: Tensor | None = None) -> Grid:
        """Empty grid for W0_t [cols, rows] in the original column order, processed in the order `perm`
        (None = original); static grids take their scales from W0 itself, group by group (original column
        blocks, or blocks of the processing order with act order "group")."""
        cols, rows = W0_t.shape
        width = spec.group_width(cols)
        scale_t = torch.empty(cols // width, rows, device=W0_t.device)  # [n_groups, rows]
        col_group = None
        if spec.static_groups:
            in_order = spec.has_g_idx and perm is not None  # groups formed in processing order
            W_g = W0_t[perm] if in_order else W0_t  # [cols, rows], the columns in group order
            tiles = W_g.T.reshape(rows * (cols // width), width)  # [rows * n_groups, width]
            scale_t.copy_(group_scales(tiles, spec).reshape(rows, cols // width).T)
            order = torch.arange(cols, device=W0_t.device) if perm is None or in_order else perm
            col_group = order // width  # [cols]
        return cls(spec, width, scale_t, torch.empty_like(W0_t), col_group)

    @property
    def static(self) -> bool:
        return self.col_group is not None

    def column_scales(self, p0: int, p1: int) -> Tensor:
        """Scales [p1 - p0, rows] of the columns at processing positions p0..p1-1 (a dynamic grid's range must
        lie in one group, whose scales are set)."""
        if self.col_group is None:
            return self.scale_t[p0 // self.width].expand(p1 - p0, -1)
        return self.scale_t[self.col_group[p0:p1]]


def prepare(W: Tensor, H: Tensor, cfg: PruneConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Validate, then (W0^T [cols, rows] float32 copy, H float32 [cols, cols], dead [cols] bool) with dead
    inputs patched: H_jj = 1, W[:, j] = 0 (H is copied only when it must be patched)."""
    check_layer(W, H, cfg)
    if cfg.quant is not None:
        cfg.quant.group_width(W.shape[1])  # raises unless the groups divide in_features
    W0_t = W.detach().T.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # [cols, rows]
    Hf = H.detach().float()  # [cols, cols]
    dead = dead_columns(Hf)  # [cols]
    if bool(dead.any()):
        Hf = Hf.clone()
        torch.diagonal(Hf)[dead] = 1.0
        W0_t[dead] = 0.0
    return W0_t, Hf, dead


def reverse_cholesky(H: Tensor, lam: float) -> tuple[Tensor, float]:
    """(R, λ): R R^T = H + λI with R upper triangular, held in the upper triangle of the returned
    [cols, cols] tensor (its strict lower triangle is scratch). Raises FactorizationError if not PD.

    Blocked from the bottom-right corner: R_kk = J chol(J A_kk J) J (J reverses the order),
    R_<k,k = A_<k,k R_kk^-T, then A_<k,<k -= R_<k,k R_<k,k^T on the upper triangle only.
    """
    A = H.to(torch.float32, copy=True)  # [cols, cols], overwritten by R
    torch.diagonal(A).add_(lam)
    starts = range(0, A.shape[0], CHOL_BLOCK)
    for k0 in reversed(starts):
        k1 = min(k0 + CHOL_BLOCK, A.shape[0])
        L, info = torch.linalg.cholesky_ex(A[k0:k1, k0:k1].flip((0, 1)))
        if int(info) != 0:
            raise FactorizationError(
                f"Cholesky of H + {lam:.4g}*I failed: not positive definite (diagonal block at columns {k0}:{k1})"
            )
        R_kk = L.flip((0, 1))  # [b, b] upper, R_kk R_kk^T = A_kk
        A[k0:k1, k0:k1] = R_kk
        if k0 == 0:
            break
        P = torch.linalg.solve_triangular(R_kk.mT, A[:k0, k0:k1], upper=False, left=False)  # [k0, b]
        A[:k0, k0:k1] = P
        for j0 in range(0, k0, CHOL_BLOCK):
            j1 = min(j0 + CHOL_BLOCK, k0)
            A[:j1, j0:j1].addmm_(P[:j1], P[j0:j1].T, alpha=-1)
    return A, lam


def obs_sweep(W0_t: Tensor, R: Tensor, cfg: PruneConfig, grid: Grid | None = None) -> tuple[Tensor, Tensor, float, float]:
    """Blocked OBS pass on W^T: (Ŵ^T [cols, rows] float32, keep^T, ||E||_F^2, ||W - Ŵ||_F^2).

    Without `grid` the kept weights stay as updated (pruning); with it they are rounded onto its grid and
    `grid` receives the scales and codes. The mask is SparseGPT's (none when nothing is pruned).
    """
    cols, rows = W0_t.shape
    out_t = torch.zeros_like(W0_t)  # [cols, rows]: pending G^T for later blocks, Ŵ^T for finished ones
    keep_t = torch.ones(cols, rows, dtype=torch.bool, device=W0_t.device)
    err_sq = delta_sq = 0.0
    for i1 in range(0, cols, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, cols)
        R_b = R[i1:i2, i1:i2].triu()  # [b, b] upper
        U_b = torch.linalg.solve_triangular(R_b, torch.eye(i2 - i1, device=R.device), upper=True)  # [b, b] = U_BB
        W_t = torch.addmm(W0_t[i1:i2], U_b.T, out_t[i1:i2])  # [b, rows] block at its start
        E_t = sweep_block(W_t, keep_t[i1:i2], U_b, cfg, block_prune_count(cfg, rows, i1, i2), grid, i1)
        out_t[i1:i2] = W_t
        delta_t = W0_t[i1:i2] - W_t  # [b, rows] total change δ_B^T
        err_sq += _sq_norm(E_t)
        delta_sq += _sq_norm(delta_t)
        if i2 < cols:
            out_t[i2:].addmm_(R[i1:i2, i2:].T, delta_t)  # G_C^T += R_BC^T δ_B^T
    return out_t, keep_t, err_sq, delta_sq


def sweep_block(
    W_t: Tensor, keep_t: Tensor, U_b: Tensor, cfg: PruneConfig, k: int, grid: Grid | None = None, col0: int = 0
) -> Tensor:
    """OBS sweep of one block (columns col0.. of W), in place: W_t [b, rows] becomes the block's targets,
    keep_t [b, rows] its mask; returns the OBS errors E^T [b, rows].

    `k` is the block's pruned count (per row for scope "row", in total for "matrix"; unused for N:M).
    The block is swept in segments (a quantization group each, else the whole block) of micro-blocks of
    MICRO columns (a multiple of M for N:M): rank-1 updates stay inside a micro-block, one matmul brings
    each micro-block up to date with the segment's earlier columns and one each segment with the block's.
    """
    b = W_t.shape[0]
    d = torch.diagonal(U_b)[:, None]  # [b, 1]
    E_t = torch.empty_like(W_t)  # [b, rows], each row written before it is read
    S_t = torch.empty_like(W_t) if grid is None else W_t.new_empty(0)  # [b, rows]: 1/d_j where pruned, else 0
    prunes = cfg.nm is not None or cfg.target_sparsity > 0 or grid is None
    if cfg.nm is None and prunes:
        saliency = (W_t / d).square()  # [b, rows] w^2 / d^2
        if cfg.scope == "row":
            keep_t.copy_(prune_lowest(saliency, k, dim=0))
        else:
            keep_t.copy_(prune_lowest(saliency.reshape(-1), k, dim=0).reshape(saliency.shape))
        if grid is None:
            torch.div(~keep_t, d, out=S_t)
    step = MICRO if cfg.nm is None else cfg.nm[1] * -(-MICRO // cfg.nm[1])  # multiple of M for N:M
    seg = b if grid is None or grid.static else grid.width  # groups never straddle blocks (config rule)
    for s0 in range(0, b, seg):
        s1 = min(s0 + seg, b)
        if s0:
            W_t[s0:s1].addmm_(U_b[:s0, s0:s1].T, E_t[:s0], alpha=-1)  # the segment, up to date with the block
        if grid is not None and not grid.static:
            grid.scale_t[(col0 + s0) // grid.width] = group_scales(W_t[s0:s1].T, grid.spec)[:, 0]
        for j0 in range(s0, s1, step):
            j1 = min(j0 + step, s1)
            if j0 > s0:
                W_t[j0:j1].addmm_(U_b[s0:j0, j0:j1].T, E_t[s0:j0], alpha=-1)  # from the segment's earlier ones
            if grid is None:
                _sweep_micro(W_t, E_t, U_b, S_t, keep_t, d, j0, j1, cfg.nm)
            else:
                _sweep_micro_quant(W_t, E_t, U_b, keep_t, d, j0, j1, cfg.nm, prunes, grid, col0)
    if grid is None:
        W_t.mul_(keep_t)  # pruned entries exactly 0
    return E_t


def _sweep_micro(
    W_t: Tensor, E_t: Tensor, U_b: Tensor, S_t: Tensor, keep_t: Tensor, d: Tensor,
    j0: int, j1: int, nm: tuple[int, int] | None,
) -> None:
    """Pruning, columns j0..j1-1 in order: e_j = s_j w_j, then w_{j+1:j1} -= U[j, j+1:j1]^T e_j (in place).

    For N:M, each group of M columns gets its mask from its current weights when the sweep reaches it.
    """
    W_m, E_m, S_m, U_m = W_t[j0:j1], E_t[j0:j1], S_t[j0:j1], U_b[j0:j1, j0:j1]  # [u, rows], [u, u]
    w, e, s, u = W_m.unbind(0), E_m.unbind(0), S_m.unbind(0), U_m.unbind(0)  # per-column views
    for a in range(j1 - j0):
        if nm is not None and a % nm[1] == 0:
            _nm_mask(W_t, S_t, keep_t, d, j0 + a, nm)
        torch.mul(w[a], s[a], out=e[a])
        if a + 1 < j1 - j0:
            W_m[a + 1 :].addr_(u[a][a + 1 :], e[a], alpha=-1)


def _sweep_micro_quant(
    W_t: Tensor, E_t: Tensor, U_b: Tensor, keep_t: Tensor, d: Tensor,
    j0: int, j1: int, nm: tuple[int, int] | None, masked: bool, grid: Grid, col0: int,
) -> None:
    """Quantizing, columns j0..j1-1 in order: ŵ_j = m_j s_g round(w_j / s_g), e_j = (w_j - ŵ_j) / d_j, then
    w_{j+1:j1} -= U[j, j+1:j1]^T e_j; w_j becomes ŵ_j and its codes go to `grid` (in place).

    When `masked` (joint mode), N:M picks each M columns' mask when the sweep reaches them and an
    unstructured mask is already in keep_t; otherwise nothing is masked.
    """
    W_m, E_m, U_m = W_t[j0:j1], E_t[j0:j1], U_b[j0:j1, j0:j1]  # [u, rows], [u, u]
    w, e, u = W_m.unbind(0), E_m.unbind(0), U_m.unbind(0)  # per-column views
    codes = grid.codes_t[col0 + j0 : col0 + j1].unbind(0)
    scales = grid.column_scales(col0 + j0, col0 + j1).unbind(0)  # [rows] each
    for a in range(j1 - j0):
        j = j0 + a
        if masked and nm is not None and a % nm[1] == 0:
            _nm_mask(W_t, None, keep_t, d, j, nm)
        scale = scales[a]  # [rows]
        c = quantize_codes(w[a], scale, grid.spec)  # [rows] codes
        if masked:
            c.mul_(keep_t[j])  # 0 where pruned
        codes[a].copy_(c)
        q = c.mul_(scale)  # [rows] ŵ_j
        torch.sub(w[a], q, out=e[a]).div_(d[j])
        w[a].copy_(q)
        if a + 1 < j1 - j0:
            W_m[a + 1 :].addr_(u[a][a + 1 :], e[a], alpha=-1)


def _nm_mask(W_t: Tensor, S_t: Tensor | None, keep_t: Tensor, d: Tensor, j: int, nm: tuple[int, int]) -> None:
    """Mask of the M columns j..j+M-1 from their current weights (lowest w^2 / d^2 pruned), and S_t there."""
    g = slice(j, j + nm[1])
    keep_t[g] = prune_lowest((W_t[g] / d[g]).square(), nm[1] - nm[0], dim=0)  # [M, rows]
    if S_t is not None:
        torch.div(~keep_t[g], d[g], out=S_t[g])


def block_prune_count(cfg: PruneConfig, rows: int, i1: int, i2: int) -> int:
    """Block's share of the pruned count, so that the shares of all blocks sum exactly to the target."""
    s = cfg.target_sparsity
    if cfg.scope == "matrix":
        return n_pruned(s, rows * i2) - n_pruned(s, rows * i1)
    return n_pruned(s, i2) - n_pruned(s, i1)


def _sq_norm(t: Tensor) -> float:
    """||t||_F^2 as one dot product (float32 accumulation)."""
    flat = t.reshape(-1)
    return float(flat @ flat)
