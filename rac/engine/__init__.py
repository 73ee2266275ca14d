"""Sequential layer-wise compression engine: streamed layers, disk-backed activations, checkpoints."""

from rac.engine.checkpoint import CheckpointFile, LinearRecord, StepRecord
from rac.engine.sequential import CompressConfig, CompressResult, compress

__all__ = ["CheckpointFile", "CompressConfig", "CompressResult", "LinearRecord", "StepRecord", "compress"]
