"""Reconstruction error from H equals the per-token sums it stands for."""

from __future__ import annotations

import pytest
import torch

from rac.pruners.error import per_token_error, reconstruction_loss, relative_error


def _case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 10, generator=g, dtype=torch.float64)
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    W_hat = W * (torch.rand(6, 10, generator=g, dtype=torch.float64) > 0.5)
    return X, W, W_hat


def test_loss_and_relative_error_equal_token_sums() -> None:
    X, W, W_hat = _case()
    H = X.T @ X
    per_token_sq = ((X @ (W - W_hat).T) ** 2).sum(1)  # ||ΔW x_t||^2
    ref_sq = ((X @ W.T) ** 2).sum(1)
    assert reconstruction_loss(W, W_hat, H) == pytest.approx(float(per_token_sq.sum()), rel=1e-5)
    assert relative_error(W, W_hat, H) == pytest.approx(float(per_token_sq.sum() / ref_sq.sum()), rel=1e-5)
    torch.testing.assert_close(per_token_error(W, W_hat, X), (per_token_sq / ref_sq).float(), rtol=1e-5, atol=1e-7)


def test_per_token_error_is_nan_where_the_reference_output_is_zero() -> None:
    X, W, W_hat = _case()
    X[3] = 0.0
    err = per_token_error(W, W_hat, X)
    assert err.shape == (30,) and torch.isnan(err[3]) and torch.isfinite(err[torch.arange(30) != 3]).all()


def test_bad_shapes_and_zero_energy() -> None:
    X, W, W_hat = _case()
    H = X.T @ X
    with pytest.raises(ValueError, match=r"W_hat shape \(6, 9\)"):
        reconstruction_loss(W, W_hat[:, :9], H)
    with pytest.raises(ValueError, match=r"H must be \[10, 10\].*\(9, 9\)"):
        reconstruction_loss(W, W_hat, H[:9, :9])
    with pytest.raises(ValueError, match=r"X must be \[T, 10\].*\(30, 9\)"):
        per_token_error(W, W_hat, X[:, :9])
    with pytest.raises(ValueError, match="reference energy"):
        relative_error(torch.zeros_like(W), W_hat, H)
