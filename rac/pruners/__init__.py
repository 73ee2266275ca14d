"""Layer-wise pruners as pure functions over tensors, a name registry and a uniform dispatcher.

Every entry of `PRUNERS` has the signature (W [out, in], H [in, in], cfg) -> PruneResult:
magnitude ignores H for the mask (it only reports the loss), wanda takes its column norms from
sqrt(diag H), sparsegpt and alps use H fully.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from rac.pruners.alps import alps
from rac.pruners.base import METHODS, FactorizationError, PruneConfig, PruneResult, Retry, check_layer
from rac.pruners.magnitude import magnitude
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
}
assert tuple(PRUNERS) == METHODS, f"the registry {tuple(PRUNERS)} must list exactly PruneConfig's methods {METHODS}"


def get_pruner(name: str) -> Pruner:
    """The registered pruner `name`; raises ValueError listing the known names."""
    try:
        return PRUNERS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {sorted(PRUNERS)}") from None


def prune(W: Tensor, H: Tensor, cfg: PruneConfig) -> PruneResult:
    """Prune one linear layer's weight W with input second moment H, as `cfg.method` says."""
    return get_pruner(cfg.method)(W, H, cfg)


__all__ = [
    "PRUNERS",
    "FactorizationError",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "Retry",
    "alps",
    "get_pruner",
    "magnitude",
    "prune",
    "sparsegpt",
    "wanda",
]
