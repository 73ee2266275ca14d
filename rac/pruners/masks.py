"""Pruning masks from importance scores: unstructured at a target sparsity, and N:M.

A mask is a bool tensor shaped like the weight [out_features, in_features]; True = weight kept.
Higher score = more important; the lowest scores are pruned. Ties are broken by `torch.topk`.

Exact counts
------------
* Pruned count. For n weights at sparsity s the number pruned is k = floor(s * n + 1/2), i.e. s * n
  rounded half up (`n_pruned`). Scope "row" (the default of these functions, and of Wanda, magnitude and
  ALPS) prunes exactly k = n_pruned(s, in_features) weights in every output row; scope "matrix" prunes
  exactly n_pruned(s, out_features * in_features) weights over the whole matrix (rows may differ).
  SparseGPT's default is "matrix" applied per block of columns (exact count per block over all rows, as
  the paper and llm-compressor; see `rac.pruners.base.DEFAULT_SCOPE` and `rac.pruners.sparsegpt`).
* N:M. ``nm = (N, M)`` means: keep at most N non-zeros in every M consecutive input columns of each
  row. The groups are columns [g*M, (g+1)*M) of one output row and exactly M - N entries of each group
  are pruned (a kept weight may itself be zero, hence "at most"). 2:4 keeps 2 of every 4 (50 % sparse),
  4:8 keeps 4 of every 8. N is always the KEPT count here; other tools name the pruned count
  ("prunen") and disagree with each other. Requires 0 < N < M and in_features % M == 0. The sparsity
  implied by N:M is 1 - N/M.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Scope = Literal["row", "matrix"]


def n_pruned(sparsity: float, n: int) -> int:
    """Number of weights pruned out of `n` at `sparsity`: floor(sparsity * n + 1/2)."""
    check_sparsity(sparsity)
    if n < 0:
        raise ValueError(f"weight count must be >= 0, got {n}")
    return math.floor(sparsity * n + 0.5)


def check_sparsity(sparsity: float) -> None:
    """Raise ValueError unless 0 <= sparsity < 1 (NaN rejected)."""
    if not (isinstance(sparsity, int | float) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def check_nm(n: int, m: int, in_features: int | None = None) -> None:
    """Raise ValueError unless 0 < N < M and (when given) in_features % M == 0."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"N:M needs integers 0 < N < M (N kept of every M), got N={n!r}, M={m!r}")
    if in_features is not None and in_features % m != 0:
        raise ValueError(
            f"N:M {n}:{m} needs in_features divisible by M: in_features={in_features}, M={m}"
        )


def prune_lowest(scores: Tensor, k: int, dim: int) -> Tensor:
    """Bool keep-mask with the `k` lowest scores along `dim` of every slice set False."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices
        keep.scatter_(dim, idx, False)
    return keep


def unstructured_mask(scores: Tensor, sparsity: float, scope: Scope = "row") -> Tensor:
    """Keep-mask pruning exactly n_pruned(sparsity, ...) lowest scores per row or per matrix."""
    _check_scores(scores)
    rows, cols = scores.shape
    if scope == "row":
        return prune_lowest(scores, n_pruned(sparsity, cols), dim=1)  # [rows, cols]
    if scope == "matrix":
        flat = prune_lowest(scores.reshape(-1), n_pruned(sparsity, rows * cols), dim=0)
        return flat.reshape(rows, cols)
    raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask keeping the N highest scores in every M consecutive columns of each row."""
    _check_scores(scores)
    rows, cols = scores.shape
    check_nm(n, m, cols)
    groups = scores.reshape(rows, cols // m, m)  # [rows, groups, M]
    return prune_lowest(groups, m - n, dim=2).reshape(rows, cols)


def make_mask(
    scores: Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: Scope = "row"
) -> Tensor:
    """N:M mask when `nm` is given (sparsity and scope then unused), else the unstructured mask."""
    if nm is not None:
        return nm_mask(scores, nm[0], nm[1])
    return unstructured_mask(scores, sparsity, scope)


def all_finite(t: Tensor) -> bool:
    """True when no entry of `t` is NaN or Inf (one reduction; the exact elementwise test only
    runs when the sum itself is not finite, e.g. after an overflow)."""
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out_features, in_features], got shape {tuple(scores.shape)}")
    if not all_finite(scores):
        raise ValueError(f"scores contain {int((~torch.isfinite(scores)).sum())} NaN/Inf values")
