"""`CompressConfig`: the engine's one validated stage config (pruner, which linears, order, dtypes, segment
weights, batching, device, mixture-of-experts settings); its stable hash names the prune stage's artifacts."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from rac.config import StageConfig
from rac.data.segments import SEGMENT_IDS
from rac.engine.experts import ExpertConfig, check_expert_config
from rac.models.adapters import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from rac.pruners.base import PruneConfig


class CompressConfig(StageConfig):
    """How the engine prunes a model: pruner, which linears, order, dtypes, segment weights, batching."""

    prune: PruneConfig
    include: tuple[str, ...] = DEFAULT_INCLUDE  # globs over e.g. "model.layers.3.mlp.up_proj"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    sequential: Literal["layer", "group"] = "group"
    act_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # activation store on disk
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the layer forward
    segment_weights: dict[str, float] = {"prompt": 1.0, "decode": 1.0, "other": 1.0}
    batch_tokens: int = 4096  # tokens per forward batch (equal-length sequences)
    device: Literal["cpu", "cuda"] = "cpu"
    trust_remote_code: bool = False
    # mixture-of-experts models (rac.engine.experts); the defaults stay out of canonical(): dense keys unchanged
    moe: ExpertConfig = Field(default_factory=ExpertConfig, exclude_if=lambda v: v == ExpertConfig())

    @field_validator("segment_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(SEGMENT_IDS))
        if unknown:
            raise ValueError(f"unknown segment(s) {unknown} in segment_weights; known: {sorted(SEGMENT_IDS)}")
        bad = {k: w for k, w in v.items() if not (math.isfinite(w) and w >= 0)}
        if bad or not any(w > 0 for w in v.values()):
            raise ValueError(f"segment_weights must be finite, >= 0 and not all 0, got {v}")
        return v

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
            check_expert_config(v, info.data["prune"].method, info.data["sequential"])
        return v
