"""Streaming second-moment statistics of a linear layer's input, kept per token segment.

For an input stream x_t in R^d the accumulator keeps, for every declared segment s (prompt, decode,
other; ids from `rac.data.segments`), H_s = sum_{t in s} x_t x_t^T and the token count n_s. Counting is
in tokens, not sequences; masked tokens (padding) are left out entirely. Any weighting
H = sum_s w_s H_s can be formed afterwards without a second pass; a weight w on a segment equals
scaling that segment's tokens by sqrt(w). Wanda's column norms are ||X_j||_2 = sqrt(H_jj).

Accumulators merge by summation. `state()` exposes the live buffers (one [S, d, d] tensor and one
int64 [S] count tensor) so data-parallel workers can `torch.distributed.all_reduce` them in place.

Cost. The outer products are the statistics pass's largest cost (about a layer forward's FLOPs, in float32).
Since H is symmetric, wide inputs (d >= `SYMMETRIC_MIN`) get only the blocks on and above the diagonal,
one GEMM per block row of `GRAM_BLOCK` columns (H[i, i:] += X_i^T X_{i:}: about half the multiply-adds),
and the strict lower triangle is mirrored from the upper one when the sums are read (`hessians`, `state()`,
`hessian()`), so H is exactly symmetric. Low-precision inputs are upcast to float32 in chunks of
`UPCAST_TOKENS` tokens, never as one full float32 copy of the batch.
`DiagAccumulator` keeps only the diagonals (for Wanda and magnitude: d multiply-adds per token, not d^2).
Files are safetensors with metadata {format, n_features, dtype, segments, tokens}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from rac.data.segments import SEGMENT_IDS
from rac.dtypes import dtype_name, torch_dtype
from rac.pruners.masks import all_finite
from rac.store.artifacts import atomic_path

FILE_FORMAT = "rac.hessian.v1"
DEFAULT_SEGMENT = "other"
_ACC_DTYPES = ("float32", "float64")
SYMMETRIC_MIN = 1024  # input width from which only the upper block triangle is accumulated
GRAM_BLOCK = 256  # columns per block row of the upper-triangle accumulation
UPCAST_TOKENS = 1024  # tokens upcast to the accumulator dtype at a time


def add_gram(H: Tensor, x: Tensor, upper_only: bool) -> None:
    """H += x^T x for x [T, d] (already in H's dtype). With `upper_only`, only the blocks on and above the
    diagonal are written (block rows of GRAM_BLOCK columns): the strict lower triangle of H is then stale."""
    d = x.shape[1]
    if not upper_only:
        H.addmm_(x.T, x)
        return
    for i0 in range(0, d, GRAM_BLOCK):
        i1 = min(i0 + GRAM_BLOCK, d)
        H[i0:i1, i0:].addmm_(x[:, i0:i1].T, x[:, i0:])  # [b, d - i0] += [b, T] @ [T, d - i0]


def mirror_upper(H: Tensor) -> None:
    """Copy the upper triangle of H [d, d] onto its strict lower triangle, in place (blocks of GRAM_BLOCK)."""
    d = H.shape[0]
    for i0 in range(0, d, GRAM_BLOCK):
        i1 = min(i0 + GRAM_BLOCK, d)
        if i1 < d:
            H[i1:, i0:i1] = H[i0:i1, i1:].T  # the block column below the diagonal block
        blk = H[i0:i1, i0:i1]
        blk.copy_(blk.triu() + blk.triu(1).T)


class HessianAccumulator:
    """Per-segment running sum of x x^T over tokens of a `n_features`-wide input."""

    def __init__(
        self,
        n_features: int,
        dtype: torch.dtype = torch.float32,
        segments: Sequence[str] = tuple(SEGMENT_IDS),
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features <= 0:
            raise ValueError(f"n_features must be a positive int, got {n_features!r}")
        if dtype not in (torch_dtype(n) for n in _ACC_DTYPES):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        names = tuple(segments)
        unknown = [s for s in names if s not in SEGMENT_IDS]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(f"segments must be distinct names from {sorted(SEGMENT_IDS)}, got {names!r}")
        self.n_features = n_features
        self.dtype = dtype
        self.segments = names
        self._slot = {SEGMENT_IDS[name]: i for i, name in enumerate(names)}  # segment id -> slot
        self._sums = torch.zeros(len(names), n_features, n_features, dtype=dtype, device=device)  # [S, d, d]
        self.counts = torch.zeros(len(names), dtype=torch.int64, device=device)  # [S] tokens
        self._upper_only = n_features >= SYMMETRIC_MIN
        self._stale = False  # lower triangles of `_sums` not yet mirrored from the upper ones

    @property
    def hessians(self) -> Tensor:
        """The per-segment sums H_s [S, d, d] (live buffer; symmetric)."""
        if self._stale:
            for slot in range(self._sums.shape[0]):
                mirror_upper(self._sums[slot])
            self._stale = False
        return self._sums

    def add(self, x: Tensor, segment_ids: Tensor | None = None, token_mask: Tensor | None = None) -> None:
        """Add the tokens of `x` [..., d]; `segment_ids`/`token_mask` [...] label and filter them.

        Without `segment_ids` every token counts as segment "other". `token_mask` True = counted.
        """
        if x.dim() < 1 or x.shape[-1] != self.n_features:
            raise ValueError(f"x must be [..., {self.n_features}], got shape {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
        dev = self._sums.device
        xs = x.detach().reshape(-1, self.n_features).to(dev)  # [T, d]
        seg = self._segment_ids(segment_ids, lead).to(dev)  # [T] int64
        if token_mask is not None:
            if tuple(token_mask.shape) != lead or token_mask.dtype != torch.bool:
                raise ValueError(
                    f"token_mask must be bool with shape {lead}, got {token_mask.dtype} {tuple(token_mask.shape)}"
                )
            keep = token_mask.reshape(-1).to(dev)
            if not bool(keep.all()):  # no copy of a batch without padding
                xs, seg = xs[keep], seg[keep]
        if not all_finite(xs):
            raise ValueError(f"x contains {int((~torch.isfinite(xs)).sum())} NaN/Inf values")
        present = torch.unique(seg).tolist()
        for sid in present:
            slot = self._slot[sid]
            xt = xs if len(present) == 1 else xs[seg == sid]  # [T_s, d]
            for t0 in range(0, xt.shape[0], UPCAST_TOKENS):
                self._accumulate(slot, xt[t0 : t0 + UPCAST_TOKENS].to(self.dtype))  # upcast (e.g. from bf16)
            self.counts[slot] += xt.shape[0]

    def _accumulate(self, slot: int, x: Tensor) -> None:
        """H_slot += x^T x for x [T, d] in the accumulator dtype."""
        add_gram(self._sums[slot], x, self._upper_only)
        self._stale = self._stale or self._upper_only

    def hessian(self, weights: Mapping[str, float] | None = None, normalize: bool = False) -> Tensor:
        """H = sum_s w_s H_s [d, d] (default: all weights 1; a segment missing from `weights` gets 0).

        With `normalize`, H is divided by the weighted token count sum_s w_s n_s.
        """
        w = self._weights(weights)
        out = torch.zeros_like(self.hessians[0])  # [d, d]
        for slot, ws in enumerate(w):
            if ws != 0.0:
                out.add_(self.hessians[slot], alpha=ws)
        return out / self._weighted_tokens(w) if normalize else out

    def col_norms(self, weights: Mapping[str, float] | None = None) -> Tensor:
        """Column norms ||X_j||_2 = sqrt(H_jj) of the (weighted) input stream, [d]."""
        w = self._weights(weights)
        diag = torch.zeros_like(self.hessians[0, 0])  # [d]
        for slot, ws in enumerate(w):
            if ws != 0.0:
                diag.add_(torch.diagonal(self.hessians[slot]), alpha=ws)
        return diag.clamp_min(0.0).sqrt()

    def tokens(self, segment: str | None = None) -> int:
        """Tokens counted in `segment` (all segments when None)."""
        if segment is None:
            return int(self.counts.sum())
        return int(self.counts[self._slot_of(segment)])

    def merge(self, other: HessianAccumulator) -> HessianAccumulator:
        """Add `other`'s sums into this accumulator (same width, dtype and segments); returns self."""
        if (other.n_features, other.dtype, other.segments) != (self.n_features, self.dtype, self.segments):
            raise ValueError(
                f"cannot merge accumulator (d={other.n_features}, {other.dtype}, {other.segments}) "
                f"into (d={self.n_features}, {self.dtype}, {self.segments})"
            )
        self.hessians.add_(other.hessians.to(self._sums.device))  # both mirrored first
        self.counts += other.counts.to(self.counts.device)
        return self

    def state(self) -> dict[str, Tensor]:
        """The live buffers {"hessians": [S, d, d], "counts": int64 [S]}; summing them merges."""
        return {"hessians": self.hessians, "counts": self.counts}

    def save(self, path: str | Path) -> None:
        """Write a safetensors file atomically (`rac.store.artifacts.atomic_path`)."""
        path = Path(path)
        meta = {
            "format": FILE_FORMAT,
            "n_features": str(self.n_features),
            "dtype": dtype_name(self.dtype),
            "segments": json.dumps(list(self.segments)),
            "tokens": json.dumps({s: self.tokens(s) for s in self.segments}),
        }
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in self.state().items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> HessianAccumulator:
        """Read a file written by `save`; raises ValueError on a malformed or inconsistent file."""
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise ValueError(f"{path}: format {meta.get('format')!r} is not {FILE_FORMAT!r}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        dtype_str = meta.get("dtype", "")
        if dtype_str not in _ACC_DTYPES:
            raise ValueError(f"{path}: unsupported dtype {dtype_str!r}")
        acc = cls(int(meta["n_features"]), torch_dtype(dtype_str), json.loads(meta["segments"]), device)
        h, c = tensors.get("hessians"), tensors.get("counts")
        if h is None or c is None or h.shape != acc.hessians.shape or c.shape != acc.counts.shape:
            raise ValueError(f"{path}: tensors do not match metadata (n_features, segments)")
        acc.hessians.copy_(h)
        acc.counts.copy_(c)
        tokens = json.loads(meta["tokens"])
        if tokens != {s: acc.tokens(s) for s in acc.segments}:
            raise ValueError(f"{path}: token counts {c.tolist()} disagree with metadata {tokens}")
        return acc

    def _segment_ids(self, segment_ids: Tensor | None, lead: tuple[int, ...]) -> Tensor:
        n_tok = 1
        for s in lead:
            n_tok *= s
        if segment_ids is None:
            return torch.full((n_tok,), self._id_of(DEFAULT_SEGMENT), dtype=torch.int64)
        if tuple(segment_ids.shape) != lead or segment_ids.is_floating_point():
            raise ValueError(
                f"segment_ids must be integer with shape {lead}, got {segment_ids.dtype} {tuple(segment_ids.shape)}"
            )
        seg = segment_ids.reshape(-1).to(torch.int64)
        bad = sorted(set(torch.unique(seg).tolist()) - set(self._slot))
        if bad:
            raise ValueError(f"segment ids {bad} are not declared segments { {n: SEGMENT_IDS[n] for n in self.segments} }")
        return seg

    def _weights(self, weights: Mapping[str, float] | None) -> list[float]:
        if weights is None:
            return [1.0] * len(self.segments)
        unknown = [k for k in weights if k not in self.segments]
        if unknown:
            raise ValueError(f"unknown segments {unknown} in weights; declared: {list(self.segments)}")
        bad = {k: v for k, v in weights.items() if not (isinstance(v, int | float) and 0.0 <= v < float("inf"))}
        if bad:
            raise ValueError(f"segment weights must be finite and >= 0, got {bad}")
        return [float(weights.get(s, 0.0)) for s in self.segments]

    def _weighted_tokens(self, w: list[float]) -> float:
        total = sum(ws * int(n) for ws, n in zip(w, self.counts.tolist(), strict=True))
        if total <= 0:
            raise ValueError(f"cannot normalize: weighted token count is {total} (tokens {self.counts.tolist()})")
        return total

    def _id_of(self, name: str) -> int:
        self._slot_of(name)
        return SEGMENT_IDS[name]

    def _slot_of(self, name: str) -> int:
        if name not in self.segments:
            raise ValueError(f"segment {name!r} is not declared; declared: {list(self.segments)}")
        return self._slot[SEGMENT_IDS[name]]



class DiagAccumulator(HessianAccumulator):
    """Only the diagonals of the per-segment sums: d_s = sum_{t in s} x_t * x_t (H_s's diagonal), [S, d].

    All that Wanda (||X_j||^2 = H_jj) and magnitude read, at d multiply-adds per token instead of d^2 / 2.
    The same interface as `HessianAccumulator`, with every [.., d, d] replaced by [.., d]: `hessians` and
    `state()["hessians"]` are the diagonals [S, d], `hessian(weights)` is the weighted diagonal [d].
    """

    def __init__(
        self,
        n_features: int,
        dtype: torch.dtype = torch.float32,
        segments: Sequence[str] = tuple(SEGMENT_IDS),
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(1, dtype, segments, device)  # validates dtype and segments with a 1 x 1 buffer
        if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features <= 0:
            raise ValueError(f"n_features must be a positive int, got {n_features!r}")
        self.n_features = n_features
        self._sums = torch.zeros(len(self.segments), n_features, dtype=dtype, device=device)  # [S, d]
        self._upper_only = False

    @property
    def hessians(self) -> Tensor:
        """The per-segment diagonals d_s [S, d] (live buffer)."""
        return self._sums

    def _accumulate(self, slot: int, x: Tensor) -> None:
        self._sums[slot].add_(x.square().sum(dim=0))  # [d]

    def col_norms(self, weights: Mapping[str, float] | None = None) -> Tensor:
        """Column norms ||X_j||_2 = sqrt(d_j) of the (weighted) input stream, [d]."""
        return self.hessian(weights).clamp_min(0.0).sqrt()
