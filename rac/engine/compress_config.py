"""`CompressConfig`: the engine's one validated stage config (pruner, which linears, order, dtypes, segment
weights, batching, device, mixture-of-experts settings); its stable hash names the prune stage's artifacts.

Defaults that depend on the method: Wanda and magnitude (whose masks read nothing of H but its diagonal) run
layer-sequential on diagonal statistics (`rac.pruners.stats.DiagAccumulator`: no d x d accumulation, one
statistics pass per layer); every other method runs group-sequential on the full H.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from rac.config import StageConfig
from rac.data.segments import DEFAULT_SEGMENT_WEIGHTS, check_segment_weights
from rac.engine.experts import ExpertConfig, check_expert_config
from rac.models.adapters import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from rac.pruners.base import PruneConfig
from rac.pruners.wanda import DIAG_METHODS


class CompressConfig(StageConfig):
    """How the engine prunes a model: pruner, which linears, order, dtypes, segment weights, batching."""

    prune: PruneConfig
    include: tuple[str, ...] = DEFAULT_INCLUDE  # globs over e.g. "model.layers.3.mlp.up_proj"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    # None: the method's default (`order`), left out of canonical(), so one `compress` section serves a grid of
    # methods; a given value is kept (and hashed) as before
    sequential: Literal["layer", "group"] | None = Field(default=None, exclude_if=lambda v: v is None)
    act_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # activation store on disk
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the layer forward
    # H = sum_s w_s H_s (rac.data.segments.check_segment_weights); a run's prune entry may override it
    segment_weights: dict[str, float] = DEFAULT_SEGMENT_WEIGHTS
    batch_tokens: int = 4096  # tokens per forward batch (equal-length sequences)
    device: Literal["cpu", "cuda"] = "cpu"
    trust_remote_code: bool = False
    # mixture-of-experts models (rac.engine.experts); the defaults stay out of canonical(): dense keys unchanged
    moe: ExpertConfig = Field(default_factory=ExpertConfig, exclude_if=lambda v: v == ExpertConfig())
    # H statistics: "diag" only for DIAG_METHODS; None: "diag" for them, "full" otherwise (left out of canonical())
    statistics: Literal["full", "diag"] | None = Field(default=None, exclude_if=lambda v: v is None)

    @property
    def order(self) -> Literal["layer", "group"]:
        """The sequential order that runs: `sequential`, or by default "layer" for DIAG_METHODS (unless experts
        are chunked per pass, which needs group order) and "group" for every other method."""
        return self.sequential or default_order(self.prune.method, self.moe)

    @property
    def diag_statistics(self) -> bool:
        """Whether the engine accumulates only diag H (the pruner reads nothing else)."""
        return self.statistics == "diag" or (self.statistics is None and self.prune.method in DIAG_METHODS)

    @field_validator("segment_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        return check_segment_weights(v)

    @field_validator("batch_tokens")
    @classmethod
    def _batch(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {v}")
        return v

    @field_validator("moe")
    @classmethod
    def _experts(cls, v: ExpertConfig, info: ValidationInfo) -> ExpertConfig:
        if "prune" in info.data and "sequential" in info.data:  # declared before moe: validated first
            method = info.data["prune"].method
            check_expert_config(v, method, info.data["sequential"] or default_order(method, v))
        return v

    @field_validator("statistics")
    @classmethod
    def _statistics(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v == "diag" and "prune" in info.data and info.data["prune"].method not in DIAG_METHODS:
            raise ValueError(f"statistics='diag' serves only {list(DIAG_METHODS)}; "
                             f"{info.data['prune'].method!r} needs the full H")
        return v


def default_order(method: str, moe: ExpertConfig) -> Literal["layer", "group"]:
    """The sequential order of a config that names none (see `CompressConfig.order`)."""
    return "layer" if method in DIAG_METHODS and moe.experts_per_pass is None else "group"
