"""ALPS (Meng et al. 2024): ADMM on the layer-wise least squares, then CG on the fixed support.

Problem: min_Ŵ tr((W - Ŵ) H (W - Ŵ)^T) s.t. Ŵ has the target sparsity pattern (unstructured or N:M).
All work happens in normalised coordinates: H_s = S^-1 (H + λI) S^-1 with S = diag(sqrt(diag(H + λI)))
(unit diagonal) and W_s = W S, so the projection keeps the largest |W_ij| * ||X_j|| (Wanda's score)
and the penalty ρ is scale free. With B = W_s H_s, splitting Ŵ = D and dual V (scaled form):

  W^{t+1} = (B - V^t + ρ D^t) (H_s + ρI)^{-1}          one matmul: H_s = Q Λ Q^T is decomposed once
  D^{t+1} = P(W^{t+1} + V^t / ρ)                       projection onto the sparsity pattern
  V^{t+1} = V^t + ρ (W^{t+1} - D^{t+1})

Schedule (as in the authors' code): D^0 = P(W_s), V^0 = 0, ρ^0 = `alps_rho0`. Every
`alps_update_every` iterations the support change s (entries whose kept/pruned state flipped since
the last check) is compared with the kept count k:
  s > 0.1 k: ρ *= 1.3;  s > 0.005 k: ρ *= 1.2;  0 < s: ρ *= 1.1;  s = 0: stop (support stable).
Before ρ has grown once, a small change (s <= 0.005 k) means ρ^0 was too large: ρ /= 5 and restart
from D^0 (bounded by the iteration budget). ρ is capped at 1e6; after 30 iterations the loop also
stops once s < 0.0003 k; at most `alps_max_iter` iterations. The final support is P(W^T) of the
primal iterate. Then conjugate gradient (Jacobi-preconditioned in the original coordinates, i.e.
plain CG in the normalised ones) solves the least squares restricted to that support, starting from
the masked primal, for at most `alps_pcg_iters` iterations or relative residual 1e-4.
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
from rac.pruners.masks import make_mask

RHO_MAX = 1e6
SWITCH_ITER = 30
PCG_RTOL = 1e-4


def alps(W: Tensor, H: Tensor, cfg: PruneConfig) -> PruneResult:
    """Prune W [rows, cols] given H [cols, cols] by ADMM + CG; unstructured (row/matrix) or N:M."""
    start = time.perf_counter()
    check_layer(W, H, cfg)
    W0 = W.detach().to(torch.float32, copy=True)  # [rows, cols]
    Hf = H.detach().to(torch.float32, copy=True)  # [cols, cols]
    dead = dead_columns(Hf)
    torch.diagonal(Hf)[dead] = 1.0
    W0[:, dead] = 0.0
    (H_s, scale, evals, Q), damp, retries = factor_with_damping(Hf, cfg, normalised_eigh)
    W_s = W0 * scale  # [rows, cols] normalised weights
    B = W_s @ H_s  # [rows, cols]
    primal, info = admm(W_s, B, evals, Q, cfg)
    keep = _project_mask(primal, cfg)  # [rows, cols] bool
    X, pcg_iters = masked_cg(H_s, B, keep, primal * keep, cfg.alps_pcg_iters)
    W_hat = (X / scale) * keep  # [rows, cols]
    info |= {"pcg_iters": pcg_iters, "dead_columns": int(dead.sum())}
    return make_result("alps", W, W_hat, keep, H, start, damp, retries, info)


def normalised_eigh(H: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(H_s, scale, eigenvalues, eigenvectors) of the unit-diagonal H_s = S^-1 (H + λI) S^-1."""
    Hd = H.clone()
    torch.diagonal(Hd).add_(lam)
    diag = torch.diagonal(Hd)  # [cols]
    if not bool((diag > 0).all()):
        raise FactorizationError(f"H + {lam:.4g}*I has a non-positive diagonal (min {float(diag.min()):.4g})")
    scale = diag.sqrt()  # [cols]
    H_s = Hd / scale[:, None] / scale[None, :]  # [cols, cols]
    evals, Q = torch.linalg.eigh(H_s.double())  # [cols], [cols, cols]; float64 for accurate small eigenvalues
    if not float(evals.min()) > 0:
        raise FactorizationError(f"H + {lam:.4g}*I is not positive definite (smallest eigenvalue {float(evals.min()):.4g})")
    return H_s, scale, evals.float(), Q.float()


def admm(W_s: Tensor, B: Tensor, evals: Tensor, Q: Tensor, cfg: PruneConfig) -> tuple[Tensor, dict[str, float | int | bool]]:
    """ADMM with the increasing-ρ schedule of the module docstring; returns the last primal W."""
    D0 = W_s * _project_mask(W_s, cfg)  # [rows, cols]
    k = max(1, round(W_s.numel() * (1.0 - cfg.target_sparsity)))  # kept weights
    W, D, V = W_s.clone(), D0.clone(), torch.zeros_like(W_s)
    rho, grown, converged, restarts, it = cfg.alps_rho0, False, False, 0, 0
    keep_prev = D0 != 0
    inv = _shifted_inverse(evals, Q, rho)  # [cols, cols] (H_s + ρI)^-1
    for it in range(1, cfg.alps_max_iter + 1):
        W = (B - V + rho * D) @ inv
        Z = W + V / rho
        keep = _project_mask(Z, cfg)
        D = Z * keep
        V += rho * (W - D)
        if it % cfg.alps_update_every:
            continue
        change = int((keep != keep_prev).sum())
        keep_prev = keep
        if change > 0.005 * k:
            rho *= 1.3 if change > 0.1 * k else 1.2
            grown = True
        elif grown and change > 0:
            rho *= 1.1
        elif grown:
            converged = True
            break
        else:  # support barely moves before any growth: ρ^0 too large, shrink and restart
            rho, restarts = rho / 5, restarts + 1
            W, D, V, keep_prev = W_s.clone(), D0.clone(), torch.zeros_like(W_s), D0 != 0
        if it >= SWITCH_ITER and change < 0.0003 * k:
            converged = True
            break
        rho = min(rho, RHO_MAX)
        inv = _shifted_inverse(evals, Q, rho)
    info: dict[str, float | int | bool] = {
        "admm_iters": it, "rho": rho, "converged": converged, "restarts": restarts
    }
    return W, info


def masked_cg(H_s: Tensor, B: Tensor, keep: Tensor, X0: Tensor, max_iter: int) -> tuple[Tensor, int]:
    """Per-row CG for min_x (x - w) H_s (x - w)^T over x supported on `keep` (B = W_s H_s)."""
    K = keep.to(B.dtype)  # [rows, cols]
    X = X0 * K
    Res = (B - X @ H_s) * K  # [rows, cols] negative half-gradient on the support
    P = Res.clone()
    rz = Res.square().sum(1)  # [rows]
    stop = PCG_RTOL * (B * K).norm(dim=1)  # [rows]
    iters = 0
    while iters < max_iter:
        iters += 1
        AP = (P @ H_s) * K  # [rows, cols]
        pap = (P * AP).sum(1)  # [rows]
        alpha = torch.where(pap > 0, rz / pap, torch.zeros_like(rz))
        X += alpha[:, None] * P
        Res -= alpha[:, None] * AP
        rz_new = Res.square().sum(1)
        if bool((rz_new.sqrt() <= stop).all()):
            break
        beta = torch.where(rz > 0, rz_new / rz, torch.zeros_like(rz))
        P = Res + beta[:, None] * P
        rz = rz_new
    return X, iters


def _shifted_inverse(evals: Tensor, Q: Tensor, rho: float) -> Tensor:
    """(H_s + ρI)^-1 = Q diag(1 / (Λ + ρ)) Q^T [cols, cols]."""
    return (Q / (evals + rho)) @ Q.T


def _project_mask(Z: Tensor, cfg: PruneConfig) -> Tensor:
    """Keep-mask of the projection onto the sparsity pattern: largest |Z| per row / matrix / N:M group."""
    return make_mask(Z.abs(), cfg.target_sparsity, cfg.nm, cfg.scope)
