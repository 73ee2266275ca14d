"""Reconstruction error of a pruned linear layer, from its input second moment H or from activations.

With ΔW = W - Ŵ [out, in] and H = sum_t x_t x_t^T [in, in]:
  loss            = tr(ΔW H ΔW^T) = sum_t ||ΔW x_t||^2
  relative error  = tr(ΔW H ΔW^T) / tr(W H W^T)
  per-token error = ||ΔW x_t||^2 / ||W x_t||^2 for each row x_t of X [T, in]  -> [T]
Products run in float32; traces are reduced in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reconstruction_loss(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)^T) as a Python float."""
    _check_pair(W, W_hat)
    _check_square(H, W.shape[1])
    return _quad(W.float() - W_hat.float(), H.float())


def relative_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """tr(ΔW H ΔW^T) / tr(W H W^T); raises ValueError when the reference energy tr(W H W^T) is 0."""
    _check_pair(W, W_hat)
    _check_square(H, W.shape[1])
    Hf = H.float()
    ref = _quad(W.float(), Hf)
    if ref == 0.0:
        raise ValueError("relative error undefined: reference energy tr(W H W^T) is 0")
    return _quad(W.float() - W_hat.float(), Hf) / ref


def per_token_error(W: Tensor, W_hat: Tensor, X: Tensor) -> Tensor:
    """||(W - Ŵ) x_t||^2 / ||W x_t||^2 for X [T, in] -> float32 [T]; NaN where ||W x_t|| = 0."""
    _check_pair(W, W_hat)
    if X.dim() != 2 or X.shape[1] != W.shape[1]:
        raise ValueError(f"X must be [T, {W.shape[1]}], got shape {tuple(X.shape)}")
    Xf = X.float()
    ref = (Xf @ W.float().T).square().sum(1)  # [T]
    err = (Xf @ (W.float() - W_hat.float()).T).square().sum(1)  # [T]
    return torch.where(ref > 0, err / ref, torch.full_like(err, float("nan")))


def _quad(D: Tensor, H: Tensor) -> float:
    """tr(D H D^T) for D [rows, d], H [d, d]."""
    return float(((D @ H) * D).sum(dtype=torch.float64))


def _check_pair(W: Tensor, W_hat: Tensor) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    if W_hat.shape != W.shape:
        raise ValueError(f"W_hat shape {tuple(W_hat.shape)} differs from W shape {tuple(W.shape)}")


def _check_square(H: Tensor, d: int) -> None:
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != d:
        raise ValueError(f"H must be [{d}, {d}] to match W's in_features, got shape {tuple(H.shape)}")
