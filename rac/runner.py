"""Where the mapped tasks of a run execute: the `runner:` section of a run config (plain data, no Prefect).

    runner:
      kind: dask            # thread (default) | dask | ray
      address: null         # dask: a scheduler address ("tcp://host:8786"); ray: a cluster ("ray://..."/"auto");
                            # null: a local cluster started for the stage and closed after it
      n_workers: 2          # local cluster size (dask workers / ray CPUs / threads of the thread runner)
      threads_per_worker: 1 # torch/OpenMP threads of each worker's engine
      wave: null            # shards handed out at a time (null: n_workers with a token budget, else all)

Only CoT generation fans out (one Prefect task per prompt shard, each worker process owning one engine);
the flow builds the Prefect task runner from this (flows/generation.py). The runner is not part of any
stage key: the same config run on threads or on a cluster yields the same artifacts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rac.config import StageConfig

RUNNER_KINDS = ("thread", "dask", "ray")


class RunnerConfig(StageConfig):
    """Task runner of the generation fan-out: kind, cluster address or local size, threads, wave size."""

    kind: Literal["thread", "dask", "ray"] = "thread"
    address: str | None = None
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    wave: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _address_needs_cluster(self) -> RunnerConfig:
        if self.kind == "thread" and self.address is not None:
            raise ValueError(f"runner.address = {self.address!r}: only a dask or ray runner connects to a cluster")
        return self

    def shards_per_wave(self, has_budget: bool, n_shards: int) -> int:
        """How many shards one wave hands out: `wave`, else n_workers under a token budget, else all."""
        if self.wave is not None:
            return self.wave
        return self.n_workers if has_budget else max(1, n_shards)
