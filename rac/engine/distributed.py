"""Data-parallel statistics for `compress` over `torch.distributed` (gloo on CPU, NCCL on GPU; `torchrun`).

Every rank runs the same sequential walk over (layer, group) steps on its own share of the calibration
sequences (sequence i goes to rank i mod world): it keeps its own activation stores, runs the current
layer on its share, and contributes its partial Hessian sums. Before a group is pruned the per-segment
sums and token counts are all-reduced (a sum: H = sum over ranks of sum over their tokens x x^T), so every
rank holds the same H; every rank then prunes identically (deterministic solvers), which is checked: the
sha256 of each rank's pruned tensors must agree, else `RankMismatchError`. Each rank propagates its own
activations through the pruned layer.

Files under `work_dir`: the step checkpoints (`engine/step-*.{safetensors,json}`, `state.json`) are written
once, by rank 0, after a barrier that follows every rank's commit of its activations; each rank's stores
live in `engine/rank-RRR/`. A step is done when its record exists (as single-process); every rank must
still hold the activations entering the resume step's layer, else all ranks start over. The work dir must
be on a filesystem all ranks share (one machine, or a shared mount).

This module holds the rank context only; the launcher is `rac.engine.torchrun`:
    torchrun --nproc_per_node N -m rac.engine.torchrun MODEL CALIB OUT --config cfg.json --work-dir W
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from rac.engine.batches import Calibration, plan_batches
from rac.engine.checkpoint import Checkpoints
from rac.pruners.stats import HessianAccumulator


class RankMismatchError(RuntimeError):
    """Ranks pruned a group to different weights (their Hessians or solvers disagree)."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel `compress`: rank, world size, and the process group."""

    rank: int
    world: int
    group: object | None = None  # torch.distributed ProcessGroup (None: the default group)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world of size {self.world}")

    @classmethod
    def from_env(cls, backend: str | None = None) -> DistContext:
        """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)."""
        if not dist.is_initialized():
            for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                if var not in os.environ:
                    raise ValueError(f"${var} is not set: launch with torchrun (or set the torch.distributed env)")
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if backend == "nccl":  # one GPU per rank: "cuda" then means this rank's device
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def checkpoints(self, work_dir: Path) -> Checkpoints:
        """Shared step checkpoints, with this rank's activation stores in engine/rank-RRR/."""
        return Checkpoints(work_dir, Path(work_dir) / "engine" / f"rank-{self.rank:03d}")

    def shard(self, calib: Calibration, batch_tokens: int) -> Calibration:
        """This rank's sequences (i mod world == rank) with their own batch plan; sha256 and meta unchanged."""
        rows = list(range(self.rank, len(calib.input_ids), self.world))
        if not rows:
            raise ValueError(f"rank {self.rank} gets no sequences: the calibration has {len(calib.input_ids)} "
                             f"sequences for {self.world} ranks")
        ids = [calib.input_ids[r] for r in rows]
        segs = [calib.segments[r] for r in rows]
        _, batches = plan_batches([len(x) for x in ids], batch_tokens)
        return replace(calib, input_ids=ids, segments=segs, batches=batches)

    def barrier(self) -> None:
        dist.barrier(group=self.group)  # type: ignore[arg-type]

    def all_reduce(self, acc: HessianAccumulator) -> None:
        """Sum every rank's per-segment sums and token counts into `acc`, in place."""
        for t in acc.state().values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)  # type: ignore[arg-type]

    def all_min(self, value: int) -> int:
        """The smallest `value` over ranks."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)  # type: ignore[arg-type]
        return int(t.item())

    def check_same(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """RankMismatchError unless every rank holds bitwise the same `tensors`."""
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            h.update(name.encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, h.hexdigest(), group=self.group)  # type: ignore[arg-type]
        if len(set(digests)) != 1:
            raise RankMismatchError(f"{what}: ranks pruned to different weights (sha256 per rank: "
                                    f"{[d[:12] if d else d for d in digests]})")
