"""Port of the classic SparseGPT per-column loop (reference `fasterprune`, as in llm-compressor).

Used as the speed baseline in `bench.solvers` and as an independent second implementation in the
tests. It follows the reference line by line (dead columns, damping, Cholesky -> inverse -> upper
Cholesky of H^-1, per-block mask, per-column OBS update with a rank-1 `W1[:, i:] -= err ⊗ Hinv1[i, i:]`,
lazy cross-block matmul) with one deliberate change so that the masks are comparable with
`rac.pruners.sparsegpt`: the unstructured mask of a block prunes an exact count, the block's share of the
pruned total, instead of everything up to one threshold (`tmp <= sorted(tmp.flatten())[int(numel * s)]`, which
prunes int(numel * s) + 1 entries and every tie). `scope` names where the count applies, as
`PruneConfig.scope` does: "matrix" (the reference's rule: over the block's flattened entries, all rows together,
`round_half_up(s*rows*i2) - round_half_up(s*rows*i1)` lowest w^2/d^2) or "row" (that share of each row,
`round_half_up(s*i2) - round_half_up(s*i1)` lowest per row).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def reference_sparsegpt(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    scope: Literal["row", "matrix"] = "row",
) -> tuple[Tensor, Tensor, float]:
    """(Ŵ float32 [rows, cols], keep mask, loss sum ||E||^2 / 2 as the reference reports it); `scope` is the
    unstructured mask's count rule (N:M is per row)."""
    if scope not in ("row", "matrix"):
        raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")
    W = W.clone().float()
    H = H.clone().float()
    rows, columns = W.shape
    prunen, prunem = (nm[1] - nm[0], nm[1]) if nm is not None else (0, 0)  # reference: pruned of M

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros(rows)

    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    keep = torch.ones(rows, columns, dtype=torch.bool)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if scope == "row":
                k = _round_half_up(sparsity * i2) - _round_half_up(sparsity * i1)
                if k > 0:
                    mask1.scatter_(1, torch.topk(tmp, k, dim=1, largest=False)[1], True)
            else:
                k = _round_half_up(sparsity * rows * i2) - _round_half_up(sparsity * rows * i1)
                if k > 0:
                    mask1.view(-1)[torch.topk(tmp.flatten(), k, largest=False)[1]] = True
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~mask1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return W, keep, float(Losses.sum())


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)
