"""The cots stage on a local Dask cluster (2 worker processes) through Prefect, against the default runner.

The fanned-out stage must have the same cache key and the same CoT rows as the in-process stage (same seed),
also when two workers are SIGKILLed mid-run: one before its shard exists, one after writing it but before
reporting. Dask hands their tasks to the surviving worker; every shard is recorded once, every prompt
appears exactly once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="rac-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from prefect import flow  # noqa: E402

from rac.data.generate import GenerateConfig, read_cots  # noqa: E402
from rac.data.prompts import PromptsConfig  # noqa: E402
from rac.models.assets import tiny_model  # noqa: E402
from rac.models.streaming import model_revision  # noqa: E402
from rac.runs import stages as steps  # noqa: E402
from rac.runs.memo import StageOutput  # noqa: E402
from rac.runs.run_config import RunnerConfig  # noqa: E402
from rac.runs.workdir import RunRef  # noqa: E402
from rac.store.index import Index  # noqa: E402

CFG = GenerateConfig(max_new_tokens=12, shard_size=1, batch_size=1, dtype="float32", seed=3, token_budget=None)


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


def _prompts(work: Path) -> tuple[RunRef, StageOutput]:
    model = tiny_model("llama")
    env = RunRef(str(work), "r1", str(model), model_revision(model))
    Index(work).create_run("r1", "test", {}, {}, "", 1)
    return env, steps.prompts_step(env, PromptsConfig(source="gsm8k", n=5, seed=4), log=lambda m: None)


@pytest.mark.slow
def test_dask_fanout_equals_default_and_survives_killed_workers(api_url: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("prefect_dask", reason="prefect-dask (and dask[distributed]) not installed")
    from rac_prefect.flows.generation import generate_cots_stage

    env_a, prompts_a = _prompts(tmp_path / "a")
    default = _parent(env_a, prompts_a, None)
    env_b, prompts_b = _prompts(tmp_path / "b")
    assert prompts_b.output("prompts").sha256 == prompts_a.output("prompts").sha256
    before, after = tmp_path / "killed-before-write", tmp_path / "killed-after-write"
    monkeypatch.setenv("RAC_KILL_ONCE", f"cots.worker:1@{before},cots.worker-wrote:3@{after}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fan = generate_cots_stage(env_b, CFG, prompts_b, RunnerConfig(kind="dask", n_workers=2))
    assert before.exists() and after.exists()  # both workers really died mid-run
    assert fan.stage_key == default.stage_key and not fan.reused  # the runner is not part of the stage key
    assert fan.summary["shards_written"] == 5 and fan.summary["shards_reused"] == 0
    rows_a, rows_b = read_cots(default.output("cots").path), read_cots(fan.output("cots").path)
    assert rows_b.to_pylist() == rows_a.to_pylist()
    prompt_ids = pq.read_table(prompts_b.output("prompts").path).column("prompt_id").to_pylist()
    assert sorted(rows_b.column("prompt_id").to_pylist()) == sorted(prompt_ids)  # each exactly once
    shards = Index(tmp_path / "b").artifacts(fan.stage_key, "cots-shard")
    assert sorted(r.path.name for r in shards) == [f"part-0000{k}.parquet" for k in range(5)]
    assert all(r.check() is None for r in shards)
    assert fan.output("cots").check() is None
    env_c, prompts_c = _prompts(tmp_path / "c")  # the thread runner, as a subflow of a parent flow
    threads = _parent(env_c, prompts_c, RunnerConfig(kind="thread", n_workers=2))
    assert read_cots(threads.output("cots").path).to_pylist() == rows_a.to_pylist()


@flow(name="test-parent")
def _parent(env: RunRef, prompts: StageOutput, runner: RunnerConfig | None) -> StageOutput:
    from rac_prefect.flows.generation import generate_cots_stage

    return generate_cots_stage(env, CFG, prompts, runner)


def test_runner_packages_are_imported_lazily_with_a_clear_error() -> None:
    import importlib.util

    from prefect.task_runners import ThreadPoolTaskRunner

    from rac_prefect.tasks.generation import RunnerUnavailableError, build_task_runner

    threads: Any = build_task_runner(RunnerConfig(n_workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    if importlib.util.find_spec("prefect_dask") is None:
        with pytest.raises(RunnerUnavailableError, match="needs prefect-dask"):
            build_task_runner(RunnerConfig(kind="dask"))
        return
    dask: Any = build_task_runner(RunnerConfig(kind="dask", n_workers=3, threads_per_worker=2))
    assert dask.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                   "env": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}, "dashboard_address": None}
    remote: Any = build_task_runner(RunnerConfig(kind="dask", address="tcp://127.0.0.1:8786"))
    assert remote.address == "tcp://127.0.0.1:8786" and not remote.cluster_kwargs
    if importlib.util.find_spec("prefect_ray") is None:
        with pytest.raises(RunnerUnavailableError, match="needs prefect-ray"):
            build_task_runner(RunnerConfig(kind="ray"))
