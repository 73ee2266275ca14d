"""Generation fan-out: one Prefect task per CoT shard, run by the task runner of the run's `runner:` section.

`build_task_runner` makes the Prefect task runner (threads, `prefect-dask`'s DaskTaskRunner on a local
cluster or a scheduler address, `prefect-ray`'s RayTaskRunner). `generate_cots_fanout_task` is the cots
stage (same cache key and artifacts as `tasks.stages.generate_cots_task`) with its shards mapped onto
`cots_shard_task`; each worker process keeps one engine (`worker_engine`) for every shard it is given.
Tasks exchange paths and `ArtifactRef`s (path + sha256), never tensors or engines.

A worker that dies mid-shard leaves no shard file (writes are atomic); the scheduler (Dask) hands the
task to another worker, or the task fails and the next run of the flow regenerates the shard (resume).
A re-run shard is the identical file: same requests, same per-sample seeds.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from rac.data.generate import CotsPlan, GenerateConfig, open_engine, plan_cots, write_shard
from rac.data.templates import load_tokenizer
from rac.runs import stages as steps
from rac.runs.memo import StageOutput
from rac.runs.run_config import RunnerConfig
from rac.runs.workdir import RunRef
from rac.store.artifacts import ArtifactRef
from rac_prefect.tasks.progress import TaskProgress, generation_key, log

KILL_ONCE_ENV = "RAC_KILL_ONCE"  # test aid: "<point>@<marker file>,...": SIGKILL the first process reaching it


class RunnerUnavailableError(RuntimeError):
    """The configured task runner's package is not installed."""


def build_task_runner(cfg: RunnerConfig) -> TaskRunner[Any]:
    """The Prefect task runner a `runner:` section asks for (imported lazily; a clear error if missing)."""
    if cfg.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.n_workers)
    env = {"OMP_NUM_THREADS": str(cfg.threads_per_worker), "MKL_NUM_THREADS": str(cfg.threads_per_worker)}
    if cfg.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise RunnerUnavailableError(
                f"runner.kind 'dask' needs prefect-dask (pip install prefect-dask 'dask[distributed]'): {err}"
            ) from err
        if cfg.address is not None:
            return DaskTaskRunner(address=cfg.address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": cfg.n_workers, "threads_per_worker": 1, "processes": True, "env": env,
            "dashboard_address": None})
    if cfg.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise RunnerUnavailableError(f"runner.kind 'ray' needs prefect-ray (pip install prefect-ray): {err}") from err
        init: dict[str, Any] = {"runtime_env": {"env_vars": env}}
        if cfg.address is None:
            init["num_cpus"] = cfg.n_workers
        return RayTaskRunner(address=cfg.address, init_kwargs=init)  # type: ignore[no-any-return]
    raise ValueError(f"unknown runner kind {cfg.kind!r}")


# ------------------------------------------------------------------ per-process engine cache
_LOCK = threading.Lock()
_ENGINE: dict[str, Any] = {}  # {"key": str, "engine": Engine, "tok": tokenizer, "lock": Lock}
_PLANS: dict[tuple[str, str, str, str], CotsPlan] = {}


def _engine_key(cfg: GenerateConfig, model_dir: str) -> str:
    fields = ("engine", "dtype", "batch_size", "kv_cache_gib", "seed", "tensor_parallel_size", "data_parallel_size")
    return json.dumps({"model": model_dir, **{f: getattr(cfg, f) for f in fields}}, sort_keys=True)


def worker_engine(cfg: GenerateConfig, model_dir: str, threads: int | None) -> tuple[Any, Any, threading.Lock]:
    """This process's engine for (model, engine settings), opened on first use and kept for later shards
    (a different model or setting closes the old one first). Callers generate under the returned lock.
    `threads`: torch threads of this worker process (None: leave them, e.g. in the flow process)."""
    key = _engine_key(cfg, model_dir)
    with _LOCK:
        if _ENGINE.get("key") != key:
            if "engine" in _ENGINE:
                with _ENGINE["lock"]:
                    _ENGINE.pop("engine").close()
            _ENGINE.clear()
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            _ENGINE.update(key=key, engine=open_engine(cfg, Path(model_dir)), tok=load_tokenizer(model_dir),
                           lock=threading.Lock())
        return _ENGINE["engine"], _ENGINE["tok"], _ENGINE["lock"]


def release_worker_engine() -> None:
    """Close this process's cached engine (the thread runner's, which lives in the flow process)."""
    with _LOCK:
        if "engine" in _ENGINE:
            with _ENGINE["lock"]:
                _ENGINE.pop("engine").close()
        _ENGINE.clear()
        _PLANS.clear()


def _plan(prompts_path: str, model_dir: str, cfg: GenerateConfig, out_dir: str) -> CotsPlan:
    key = (prompts_path, model_dir, cfg.stable_hash(), out_dir)
    with _LOCK:
        if key not in _PLANS:
            _PLANS.clear()
            _PLANS[key] = plan_cots(Path(prompts_path), Path(model_dir), cfg, Path(out_dir))
        return _PLANS[key]


def kill_once(point: str) -> None:
    """Test aid: SIGKILL this process the first time `point` is reached, when $RAC_KILL_ONCE names it
    ("<point>@<marker file>,..."; the marker records that the kill happened, so a retry gets through)."""
    for item in os.environ.get(KILL_ONCE_ENV, "").split(","):
        want, _, marker = item.strip().partition("@")
        if want != point or not marker:
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


@task(name="generate-cots-shard", retries=2, retry_delay_seconds=1, persist_result=False, cache_policy=NO_CACHE)
def cots_shard_task(prompts_path: str, model_dir: str, cfg: GenerateConfig, out_dir: str, k: int,
                    threads: int | None = None) -> ArtifactRef:
    """Generate shard `k` of a CoT plan with this worker's engine (kept if it is already there)."""
    plan = _plan(prompts_path, model_dir, cfg, out_dir)
    engine, tok, lock = worker_engine(cfg, model_dir, threads)
    kill_once(f"cots.worker:{k}")  # dies before the shard exists
    with lock:
        path = write_shard(plan, k, engine, tok)
    kill_once(f"cots.worker-wrote:{k}")  # dies with the shard on disk, its result unreported
    return ArtifactRef.of(path, "cots-shard")


class PrefectShards:
    """A `generate_cots` shard runner that maps the requested shards onto `cots_shard_task`."""

    def __init__(self, prompts_path: Path, model_dir: Path, runner: RunnerConfig) -> None:
        self.prompts_path, self.model_dir, self.runner = str(prompts_path), str(model_dir), runner
        # worker processes get their thread count; the thread runner's shards run in the flow process
        self.threads = None if runner.kind == "thread" else runner.threads_per_worker

    def __call__(self, plan: CotsPlan, ks: list[int]) -> None:
        futures = cots_shard_task.map(unmapped(self.prompts_path), unmapped(self.model_dir), unmapped(plan.cfg),
                                      unmapped(str(plan.out_dir)), ks, threads=unmapped(self.threads))
        refs = [f.result() for f in futures]
        for k, ref in zip(ks, refs, strict=True):
            if ref.path != plan.path(k):
                raise RuntimeError(f"shard task {k} returned {ref.path}, expected {plan.path(k)}")


@task(name="generate-cots", persist_result=False, cache_policy=NO_CACHE)
def generate_cots_fanout_task(env: RunRef, cfg: GenerateConfig, prompts: StageOutput, runner: RunnerConfig,
                              model: StageOutput | None = None, name: str = "cots") -> StageOutput:
    """The cots stage with its shards fanned out over the flow's task runner (waves, see RunnerConfig);
    `model`: a progressive step's pruned model generates instead of the dense one (stage `name`)."""
    prompts_path = prompts.output("prompts").path
    n_shards = -(-pq.read_metadata(str(prompts_path)).num_rows // cfg.shard_size)
    wave = runner.shards_per_wave(cfg.token_budget is not None, n_shards)
    model_dir = model.output("model").path if model is not None else Path(env.model_dir)
    shards = PrefectShards(prompts_path, model_dir, runner)
    try:
        with TaskProgress("generation", generation_key(env, name)) as progress:
            return steps.cots_step(env, cfg, prompts, progress=progress, log=log, run_shards=shards, wave=wave,
                                   model=model, name=name)
    finally:
        if runner.kind == "thread":  # shards ran in this process: free the engine before the next stages
            release_worker_engine()
