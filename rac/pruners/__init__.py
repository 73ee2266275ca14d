"""Layer-wise pruners as pure functions over tensors, a name registry and a uniform dispatcher.

Every entry of `PRUNERS` has the signature (W [out, in], H [in, in], cfg) -> PruneResult:
magnitude ignores H for the mask (it only reports the loss), wanda takes its column norms from
sqrt(diag H), sparsegpt, alps and gptq use H fully. gptq (and sparsegpt with `cfg.quant`) also return the
integer codes and scales in `PruneResult.quant` (see `rac.pruners.quant`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from rac.pruners.alps import alps
from rac.pruners.base import METHODS, FactorizationError, PruneConfig, PruneResult, Retry, check_layer
from rac.pruners.gptq import gptq
from rac.pruners.magnitude import magnitude
from rac.pruners.quant import QuantizedWeight, QuantSpec, rtn
from rac.pruners.sparsegpt import sparsegpt
from rac.pruners.wanda import col_norms_from_hessian, wanda

Pruner = Callable[[Tensor, Tensor, PruneConfig], PruneResult]


def _magnitude(W: Tensor, H: Tensor, cfg: PruneConfig) -> PruneResult:
    return magnitude(W, cfg, H)


def _wanda(W: Tensor, H: Tensor, cfg: PruneConfig) -> PruneResult:
    check_layer(W, H, cfg)  # before reading diag H
    return wanda(W, col_norms_from_hessian(H), cfg, H)


PRUNERS: dict[str, Pruner] = {
    "magnitude": _magnitude,
    "wanda": _wanda,
    "sparsegpt": sparsegpt,
    "alps": alps,
    "gptq": gptq,
}
assert tuple(PRUNERS) == METHODS, f"the registry {tuple(PRUNERS)} must list exactly PruneConfig's methods {METHODS}"


def get_pruner(name: str) -> Pruner:
    """The registered pruner `name`; raises ValueError listing the known names."""
    try:
        return PRUNERS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {sorted(PRUNERS)}") from None


def prune(W: Tensor, H: Tensor, cfg: PruneConfig) -> PruneResult:
    """Prune (and / or quantize) one linear layer's weight W with input second moment H, as `cfg` says."""
    return get_pruner(cfg.method)(W, H, cfg)


__all__ = [
    "PRUNERS",
    "FactorizationError",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "QuantSpec",
    "QuantizedWeight",
    "Retry",
    "alps",
    "get_pruner",
    "gptq",
    "magnitude",
    "prune",
    "rtn",
    "sparsegpt",
    "wanda",
]
