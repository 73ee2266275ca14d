"""Pruner configuration, result record, input validation and the damping-retry loop shared by pruners.

Sparsity rule: give either `sparsity` (unstructured, fraction pruned in [0, 1)) or `nm = (N, M)`
(keep N of every M consecutive input columns, see `rac.pruners.masks`). With `nm`, the sparsity is implied
as 1 - N/M: leave `sparsity` unset (it is filled in) or set it to exactly that value.

Quantization: `quant` (a `QuantSpec`) rounds the kept weights onto a symmetric integer grid; method "gptq"
quantizes only (sparsity implied 0.0), "sparsegpt" with `quant` prunes and quantizes in one sweep (joint mode).
Both YAML forms are accepted: flat ``{method: gptq, bits: 4, group_size: 128, act_order: false}`` (bits,
group_size and act_order at the top level are moved into `quant`; gptq without them gets `QuantSpec()`) and
nested ``{method: sparsegpt, sparsity: 0.5, quant: {bits: 4, group_size: 128}}`` (or with ``nm: [2, 4]``).

Mask scope (unstructured only): unset = the method's default (`DEFAULT_SCOPE`): SparseGPT and its joint mode
choose the mask per block over all rows ("matrix", as the paper and llm-compressor), Wanda per output row
(its comparison group), magnitude and ALPS per row. After validation `scope` always holds a concrete value,
so the canonical config names it; N:M is always per row.

Allocation: `allocation` spreads the target sparsity over decoder layers: `uniform` (default; left out of
the canonical config, so existing keys are unchanged) or `{kind: owl, M: 5, lam: 0.08}` (`rac.pruners.owl`:
per-layer sparsities from the dense model's outlier ratios, mean equal to `sparsity`; the engine measures
them, `rac.engine.allocation`). OWL needs unstructured pruning with sparsity > 0: N:M and gptq are refused.

Damping: Hessian-based pruners factor H + λI with λ = damp * mean(diag H). When the factorization
fails, they retry with damp multiplied by `damp_growth`, at most `max_retries` times; every failed
attempt is recorded in `PruneResult.retries`, and the last failure raises `FactorizationError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from rac.config import StageConfig
from rac.pruners.error import reconstruction_loss
from rac.pruners.masks import Scope, all_finite, check_nm, check_sparsity
from rac.pruners.owl import AllocationConfig, check_owl_range
from rac.pruners.quant import QuantizedWeight, QuantSpec

T = TypeVar("T")
SYMMETRY_RTOL = 1e-4  # tolerated |H - H^T| relative to max |H| (float32 X^T X is symmetric up to rounding)


class FactorizationError(ValueError):
    """H + λI could not be factored (not positive definite) at any damping tried."""


# the pruning methods; rac/pruners/__init__.py registers one solver under each name (checked at import)
METHODS = ("magnitude", "wanda", "sparsegpt", "alps", "gptq")
QUANT_METHODS = ("sparsegpt", "gptq")  # the methods that accept `quant`
FLAT_QUANT_KEYS = ("bits", "group_size", "act_order", "grid", "scales")  # gptq's top-level shorthand for quant
DEFAULT_SCOPE: dict[str, Scope] = {"magnitude": "row", "wanda": "row", "sparsegpt": "matrix", "alps": "row",
                                   "gptq": "matrix"}  # gptq prunes nothing: its scope is only named


class PruneConfig(StageConfig):
    """What to prune and / or quantize and how: method, target sparsity or N:M, quantization grid, solver knobs."""

    method: str = "sparsegpt"
    sparsity: float | None = None
    nm: tuple[int, int] | None = None
    # unstructured only: exact count per output row, or per matrix (SparseGPT: per block over all rows);
    # None / unset = the method's default (DEFAULT_SCOPE), filled in before validation
    scope: Scope = None  # type: ignore[assignment]
    quant: QuantSpec | None = None  # gptq / sparsegpt: round the kept weights onto this grid
    blocksize: int = 128  # SparseGPT: columns per lazy-update block (mask chosen per block)
    damp: float = 0.01  # relative to mean(diag H)
    damp_growth: float = 10.0
    max_retries: int = 3
    alps_rho0: float = 0.1  # initial ADMM penalty, in units of the unit-diagonal normalised H
    alps_max_iter: int = 300
    alps_update_every: int = 3  # iterations between support checks / rho updates
    alps_pcg_iters: int = 10  # conjugate-gradient iterations on the final support
    # per-layer spread of the target sparsity; uniform (the default) stays out of canonical(): keys unchanged
    allocation: AllocationConfig = Field(default_factory=AllocationConfig,
                                         exclude_if=lambda v: v == AllocationConfig())

    @model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = _flat_quant(dict(data))
        method, nm = data.get("method", "sparsegpt"), data.get("nm")
        if nm is not None and data.get("sparsity") is None:
            if isinstance(nm, tuple | list) and len(nm) == 2 and all(isinstance(v, int) for v in nm):
                if 0 < nm[0] < nm[1]:
                    data["sparsity"] = 1.0 - nm[0] / nm[1]
        if method == "gptq" and nm is None and data.get("sparsity") is None:
            data["sparsity"] = 0.0
        if data.get("scope") is None:
            data["scope"] = "row" if nm is not None else DEFAULT_SCOPE.get(method, "row")
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown pruning method {v!r}; known: {sorted(METHODS)}")
        return v

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v: float | None) -> float | None:
        if v is not None:
            check_sparsity(v)
        return v

    @field_validator("nm")
    @classmethod
    def _nm_order(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None:
            check_nm(v[0], v[1])
        return v

    @field_validator("blocksize", "max_retries", "alps_max_iter", "alps_update_every", "alps_pcg_iters")
    @classmethod
    def _positive_int(cls, v: int, info: Any) -> int:
        low = 0 if info.field_name == "max_retries" else 1
        if v < low:
            raise ValueError(f"{info.field_name} must be >= {low}, got {v}")
        return v

    @field_validator("damp", "alps_rho0")
    @classmethod
    def _positive_float(cls, v: float, info: Any) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{info.field_name} must be finite and > 0, got {v}")
        return v

    @field_validator("damp_growth")
    @classmethod
    def _growth(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 1):
            raise ValueError(f"damp_growth must be finite and > 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        self._check_quant()
        self._check_allocation()
        if self.nm is None:
            if self.sparsity is None:
                raise ValueError("give sparsity (unstructured) or nm=(N, M); got neither")
            return self
        n, m = self.nm
        if abs(self.sparsity - (1.0 - n / m)) > 1e-9:  # type: ignore[operator]
            raise ValueError(f"sparsity={self.sparsity} contradicts nm={n}:{m} (implies {1.0 - n / m})")
        if self.scope != "row":
            raise ValueError(f"scope={self.scope!r} does not apply to N:M (always per row); use 'row'")
        if self.blocksize % m != 0:
            raise ValueError(f"blocksize={self.blocksize} must be a multiple of M={m} for N:M")
        return self

    def _check_quant(self) -> None:
        q = self.quant
        if self.method == "gptq" and (self.nm is not None or (self.sparsity or 0.0) > 0):
            amount = f"nm: {list(self.nm)}" if self.nm is not None else f"sparsity: {self.sparsity}"
            grid = f"bits: {q.bits}, group_size: {q.group_size or 'null'}" if q is not None else "bits: 4, group_size: 128"
            raise ValueError(f"method 'gptq' only quantizes, got {amount}; to prune and quantize use "
                             f"{{method: sparsegpt, {amount}, quant: {{{grid}}}}}")
        if q is None:
            return
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quant applies to methods {list(QUANT_METHODS)} only, got method={self.method!r}")
        if q.act_order and self.nm is not None:
            raise ValueError(f"quant.act_order={q.act_order!r} does not combine with nm={list(self.nm)}: "
                             "N:M groups are consecutive columns in the original order")
        if q.group_size is not None and self.blocksize % q.group_size != 0:
            raise ValueError(f"blocksize={self.blocksize} must be a multiple of quant.group_size={q.group_size} "
                             "(a group is quantized inside one block)")
        if q.group_size is not None and self.nm is not None and q.group_size % self.nm[1] != 0:
            raise ValueError(f"quant.group_size={q.group_size} must be a multiple of M={self.nm[1]} for N:M")

    def _check_allocation(self) -> None:
        a = self.allocation
        if a.kind == "uniform":
            return
        if self.nm is not None:
            raise ValueError(f"allocation kind {a.kind!r} sets per-layer unstructured sparsities; it does not "
                             f"combine with nm={list(self.nm)} (fixed 1 - N/M in every layer)")
        if self.method == "gptq" or not (self.sparsity or 0.0) > 0:
            raise ValueError(f"allocation kind {a.kind!r} spreads a sparsity over layers; method={self.method!r} "
                             f"with sparsity={self.sparsity} prunes nothing (use sparsegpt/wanda/... with "
                             "sparsity > 0)")
        check_owl_range(float(self.sparsity or 0.0), a.lam)

    def canonical(self) -> dict[str, Any]:
        """As StageConfig's, without `quant` when it is None (pure-pruning configs keep their hashes)."""
        data = super().canonical()
        if data.get("quant") is None:
            data.pop("quant", None)
        return data

    @property
    def target_sparsity(self) -> float:
        """Fraction of weights pruned (1 - N/M for N:M)."""
        assert self.sparsity is not None  # guaranteed by _consistent
        return self.sparsity


def _flat_quant(data: dict[str, Any]) -> dict[str, Any]:
    """gptq's flat form: move the FLAT_QUANT_KEYS (bits, group_size, act_order, grid, scales) into `quant`
    (QuantSpec() when none is given)."""
    flat = {k: data.pop(k) for k in FLAT_QUANT_KEYS if k in data}
    method = data.get("method", "sparsegpt")
    if flat and method != "gptq":
        raise ValueError(f"top-level {sorted(flat)} are gptq's shorthand; with method={method!r} "
                         f"give them under quant: {{{', '.join(f'{k}: ...' for k in sorted(flat))}}}")
    if flat and data.get("quant") is not None:
        raise ValueError(f"give {'/'.join(FLAT_QUANT_KEYS)} either at the top level ({sorted(flat)}) or under quant, "
                         f"not both (quant={data['quant']!r})")
    if method == "gptq" and data.get("quant") is None:
        data["quant"] = flat
    return data


@dataclass(frozen=True)
class Retry:
    """One failed factorization attempt: the relative damping tried and why it failed."""

    damp: float
    error: str


@dataclass(frozen=True)
class PruneResult:
    """Output of a pruner. `weight` has the input dtype; `mask` True = kept.

    `quant` is set by the quantizing solvers (gptq, sparsegpt with `quant`): then `weight` is
    `quant.dequantize()` cast to the input dtype, `mask` is True where kept (all True when nothing is
    pruned) and the pruned entries have code 0.

    `loss` is tr((W-Ŵ) H (W-Ŵ)^T) with the undamped H (None when no H was given), computed from the
    float32 solution before the cast to the input dtype. `damp` is the relative damping actually
    used (0.0 for methods that do not factor H).
    """

    method: str
    weight: Tensor  # [out, in]
    mask: Tensor  # [out, in] bool
    loss: float | None
    damp: float
    retries: tuple[Retry, ...]
    seconds: float
    info: Mapping[str, float | int | bool | str] = field(default_factory=dict)
    quant: QuantizedWeight | None = None  # codes and scales when quantized; None for pure pruning


def check_weight(W: Tensor) -> None:
    """W must be a finite, non-empty, floating 2-D tensor [out, in]."""
    if not isinstance(W, Tensor):
        raise ValueError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"W must be a non-empty 2-D tensor [out, in], got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W must be floating point, got dtype {W.dtype}")
    _check_finite("W", W)


def check_hessian(H: Tensor, in_features: int) -> None:
    """H must be a finite, symmetric, floating [in, in] tensor."""
    if not isinstance(H, Tensor):
        raise ValueError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square 2-D, got shape {tuple(H.shape)}")
    if H.shape[0] != in_features:
        raise ValueError(f"H shape {tuple(H.shape)} does not match W in_features={in_features}")
    if not H.is_floating_point():
        raise ValueError(f"H must be floating point, got dtype {H.dtype}")
    _check_finite("H", H)
    scale = float(H.abs().amax())
    asym = float((H - H.mT).abs().amax())
    if asym > SYMMETRY_RTOL * scale:
        raise ValueError(f"H must be symmetric: max |H - H^T| = {asym:.4g} exceeds {SYMMETRY_RTOL} * max |H| = {scale:.4g}")


def check_col_norms(norms: Tensor, in_features: int) -> None:
    """Column norms must be a finite, non-negative [in] tensor."""
    if norms.dim() != 1 or norms.shape[0] != in_features:
        raise ValueError(f"col_norms must be [{in_features}], got shape {tuple(norms.shape)}")
    _check_finite("col_norms", norms)
    if bool((norms < 0).any()):
        raise ValueError(f"col_norms must be >= 0, got minimum {float(norms.min())}")


def check_layer(W: Tensor, H: Tensor | None, cfg: PruneConfig) -> None:
    """Validate W (and H when given) and the N:M divisibility for this config."""
    check_weight(W)
    if H is not None:
        check_hessian(H, W.shape[1])
    if cfg.nm is not None:
        check_nm(cfg.nm[0], cfg.nm[1], W.shape[1])


def dead_columns(H: Tensor) -> Tensor:
    """Bool [in]: inputs that never fired (H_jj == 0)."""
    return torch.diagonal(H) == 0


def factor_with_damping(
    H: Tensor, cfg: PruneConfig, factor: Callable[[Tensor, float], T]
) -> tuple[T, float, tuple[Retry, ...]]:
    """Call factor(H, λ) with λ = damp * mean(diag H), growing damp on FactorizationError.

    Returns (factor's result, relative damp used, failed attempts). Raises FactorizationError
    after 1 + max_retries failures, naming every damping tried.
    """
    mean_diag = float(torch.diagonal(H).mean())
    if not mean_diag > 0:
        raise FactorizationError(f"mean(diag H) must be > 0 to set the damping, got {mean_diag}")
    rel, retries = cfg.damp, list[Retry]()
    for _ in range(cfg.max_retries + 1):
        try:
            return factor(H, rel * mean_diag), rel, tuple(retries)
        except FactorizationError as exc:
            retries.append(Retry(damp=rel, error=str(exc)))
            rel *= cfg.damp_growth
    tried = [r.damp for r in retries]
    raise FactorizationError(f"H + damp*mean(diag H)*I not factorable for damp in {tried}: {retries[-1].error}")


def make_result(
    method: str,
    W: Tensor,
    W_hat: Tensor,
    mask: Tensor,
    H: Tensor | None,
    start: float,
    damp: float = 0.0,
    retries: tuple[Retry, ...] = (),
    info: Mapping[str, float | int | bool | str] | None = None,
    loss: float | None = None,
    quant: QuantizedWeight | None = None,
) -> PruneResult:
    """Cast Ŵ (float32) back to W's dtype and record the loss (computed from H unless given)."""
    if loss is None and H is not None:
        loss = reconstruction_loss(W, W_hat, H)
    return PruneResult(
        method=method,
        weight=W_hat.to(W.dtype),
        mask=mask,
        loss=loss,
        damp=damp,
        retries=retries,
        seconds=time.perf_counter() - start,
        info=dict(info or {}),
        quant=quant,
    )


def _check_finite(name: str, t: Tensor) -> None:
    if all_finite(t):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} NaN/Inf values (first at index {first})")
