"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning by blocked Optimal Brain Surgeon updates.

Paper notation: W [rows, cols], H = X X^T + λI, H^{-1} = U^T U with U upper triangular, d_j = U_jj.
Columns are processed left to right in blocks of B (`cfg.blocksize`). In each block the mask is
chosen once from the saliency w_ij^2 / d_j^2 (unstructured; exactly the per-block share of the
row's pruned count, see `rac.pruners.masks`) or every M columns from the current weights (N:M). Then, column
by column, the pruned weights are zeroed and their error e_j = (w_j - q_j) / d_j is compensated on
the later columns of the block through row j of U (OBS update); the block's errors update the rest of
the matrix with one matmul (lazy batch update). Dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0,
as in the reference implementation.

Faster formulation, same result as the reference loop up to rounding:
* No inverse. With R upper triangular and R R^T = H (a blocked Cholesky from the bottom-right
  corner), U = R^{-1}.
  The later columns C are updated through the block's total change δ_B = W_B - Ŵ_B by
  G_C += δ_B R_BC, and block B at its start is W_B + G_B U_BB with U_BB = R_BB^{-1} ([B, B]).
  One Cholesky replaces the reference's Cholesky + inverse + Cholesky.
* The in-block sweep runs on a transposed [B, rows] tile in micro-blocks of 16 columns: rank-1 OBS
  updates stay inside the micro-block (two torch calls per column on a small tile) and one matmul
  brings the next micro-block up to date.
* Loss from the OBS identity: since U (H + λI) U^T = I, tr(ΔW (H + λI) ΔW^T) = ||E||_F^2 and the
  undamped loss is ||E||^2 - λ ||ΔW||^2, with no extra [rows, cols] x [cols, cols] product.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from rac.pruners.base import (
    FactorizationError,
    PruneConfig,
    PruneResult,
    check_layer,
    dead_columns,
    factor_with_damping,
    make_result,
)
from rac.pruners.masks import n_pruned, prune_lowest

MICRO = 16  # columns per micro-block of the in-block sweep
CHOL_BLOCK = 256  # columns per block of the blocked reverse Cholesky


def sparsegpt(W: Tensor, H: Tensor, cfg: PruneConfig) -> PruneResult:
    """Prune W [rows, cols] given H [cols, cols]; unstructured (per row or matrix) or N:M."""
    start = time.perf_counter()
    check_layer(W, H, cfg)
    W0_t = W.detach().T.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # [cols, rows]
    Hf = H.detach().float()  # [cols, cols]; copied below only when dead inputs must be patched
    dead = dead_columns(Hf)  # [cols]
    if bool(dead.any()):
        Hf = Hf.clone()
        torch.diagonal(Hf)[dead] = 1.0
        W0_t[dead] = 0.0
    (R, lam), damp, retries = factor_with_damping(Hf, cfg, reverse_cholesky)
    W_hat_t, keep_t, err_sq, delta_sq = obs_sweep(W0_t, R, cfg)
    info = {"dead_columns": int(dead.sum()), "lambda": lam}
    loss = err_sq - lam * delta_sq  # tr(ΔW (H+λI) ΔW^T) - λ ||ΔW||^2
    return make_result(
        "sparsegpt", W, W_hat_t.T.contiguous(), keep_t.T.contiguous(), None, start, damp, retries, info, loss
    )


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


def obs_sweep(W0_t: Tensor, R: Tensor, cfg: PruneConfig) -> tuple[Tensor, Tensor, float, float]:
    """Blocked OBS pass on W^T: (Ŵ^T [cols, rows] float32, keep^T, ||E||_F^2, ||W - Ŵ||_F^2)."""
    cols, rows = W0_t.shape
    out_t = torch.zeros_like(W0_t)  # [cols, rows]: pending G^T for later blocks, Ŵ^T for finished ones
    keep_t = torch.ones(cols, rows, dtype=torch.bool, device=W0_t.device)
    err_sq = delta_sq = 0.0
    for i1 in range(0, cols, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, cols)
        R_b = R[i1:i2, i1:i2].triu()  # [b, b] upper
        U_b = torch.linalg.solve_triangular(R_b, torch.eye(i2 - i1, device=R.device), upper=True)  # [b, b] = U_BB
        W_t = torch.addmm(W0_t[i1:i2], U_b.T, out_t[i1:i2])  # [b, rows] block at its start
        E_t = sweep_block(W_t, keep_t[i1:i2], U_b, cfg, _block_prune_count(cfg, rows, i1, i2))
        out_t[i1:i2] = W_t
        delta_t = W0_t[i1:i2] - W_t  # [b, rows] total change δ_B^T
        err_sq += _sq_norm(E_t)
        delta_sq += _sq_norm(delta_t)
        if i2 < cols:
            out_t[i2:].addmm_(R[i1:i2, i2:].T, delta_t)  # G_C^T += R_BC^T δ_B^T
    return out_t, keep_t, err_sq, delta_sq


def sweep_block(W_t: Tensor, keep_t: Tensor, U_b: Tensor, cfg: PruneConfig, k: int) -> Tensor:
    """OBS sweep of one block, in place: W_t [b, rows] becomes the pruned and updated block,
    keep_t [b, rows] its mask; returns the OBS errors E^T [b, rows] (w_j / d_j where pruned, else 0).

    `k` is the block's pruned count (per row for scope "row", in total for "matrix"; unused for N:M).
    The block is swept in micro-blocks of MICRO columns: rank-1 updates stay inside a micro-block and
    one matmul brings each micro-block up to date with the earlier ones.
    """
    b = W_t.shape[0]
    d = torch.diagonal(U_b)[:, None]  # [b, 1]
    E_t = torch.empty_like(W_t)  # [b, rows], each row written before it is read
    S_t = torch.empty_like(W_t)  # [b, rows]: 1/d_j where pruned, else 0
    if cfg.nm is None:
        saliency = (W_t / d).square()  # [b, rows] w^2 / d^2
        if cfg.scope == "row":
            keep_t.copy_(prune_lowest(saliency, k, dim=0))
        else:
            keep_t.copy_(prune_lowest(saliency.reshape(-1), k, dim=0).reshape(saliency.shape))
        torch.div(~keep_t, d, out=S_t)
    step = MICRO if cfg.nm is None else cfg.nm[1] * -(-MICRO // cfg.nm[1])  # multiple of M for N:M
    for j0 in range(0, b, step):
        j1 = min(j0 + step, b)
        if j0:
            W_t[j0:j1].addmm_(U_b[:j0, j0:j1].T, E_t[:j0], alpha=-1)  # updates from earlier micro-blocks
        _sweep_micro(W_t, E_t, U_b, S_t, keep_t, d, j0, j1, cfg.nm)
    W_t.mul_(keep_t)  # pruned entries exactly 0
    return E_t


def _sweep_micro(
    W_t: Tensor, E_t: Tensor, U_b: Tensor, S_t: Tensor, keep_t: Tensor, d: Tensor,
    j0: int, j1: int, nm: tuple[int, int] | None,
) -> None:
    """Columns j0..j1-1 in order: e_j = s_j w_j, then w_{j+1:j1} -= U[j, j+1:j1]^T e_j (in place).

    For N:M, each group of M columns gets its mask from its current weights when the sweep reaches it.
    """
    W_m, E_m, S_m, U_m = W_t[j0:j1], E_t[j0:j1], S_t[j0:j1], U_b[j0:j1, j0:j1]  # [u, rows], [u, u]
    w, e, s, u = W_m.unbind(0), E_m.unbind(0), S_m.unbind(0), U_m.unbind(0)  # per-column views
    for a in range(j1 - j0):
        if nm is not None and a % nm[1] == 0:
            g = slice(j0 + a, j0 + a + nm[1])
            keep_t[g] = prune_lowest((W_t[g] / d[g]).square(), nm[1] - nm[0], dim=0)  # [M, rows]
            torch.div(~keep_t[g], d[g], out=S_t[g])
        torch.mul(w[a], s[a], out=e[a])
        if a + 1 < j1 - j0:
            W_m[a + 1 :].addr_(u[a][a + 1 :], e[a], alpha=-1)


def _block_prune_count(cfg: PruneConfig, rows: int, i1: int, i2: int) -> int:
    """Block's share of the pruned count, so that the shares of all blocks sum exactly to the target."""
    s = cfg.target_sparsity
    if cfg.scope == "matrix":
        return n_pruned(s, rows * i2) - n_pruned(s, rows * i1)
    return n_pruned(s, i2) - n_pruned(s, i1)


def _sq_norm(t: Tensor) -> float:
    """||t||_F^2 as one dot product (float32 accumulation)."""
    flat = t.reshape(-1)
    return float(flat @ flat)
