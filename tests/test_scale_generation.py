"""Generation fan-out in the library: shard runners and waves against the sequential default.

A fan-out runner here is a thread pool with one engine per thread (what a Dask worker does with its own
engine); the rows must be those of the sequential run, also when a token budget cuts the run inside a
wave, and a runner that dies part-way leaves only whole shards that a second run reuses.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from rac.data.generate import CotsPlan, GenerateConfig, generate_cots, open_engine, read_cots, write_shard
from rac.data.prompts import PromptsConfig, sample_prompts
from rac.models.assets import tiny_model
from rac.runs.run_config import RunnerConfig

CFG = GenerateConfig(max_new_tokens=10, shard_size=1, batch_size=1, dtype="float32", seed=5, token_budget=None)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("p") / "prompts.parquet"
    sample_prompts(PromptsConfig(source="gsm8k", n=5, seed=2), tiny, out)
    return out


@pytest.fixture(scope="module")
def sequential(tiny: Path, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("seq") / "cots"
    generate_cots(prompts, tiny, CFG.model_copy(update={"samples_per_prompt": 2}), out)
    return list(read_cots(out).to_pylist())


class ThreadWorkers:
    """Shard runner: a pool of `n` threads, each with its own engine, shards handed out as they free up."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.local = threading.local()
        self.engines: list[Any] = []
        self.calls: list[list[int]] = []

    def _one(self, plan: CotsPlan, k: int) -> Path:
        if not hasattr(self.local, "engine"):
            self.local.engine = open_engine(plan.cfg, plan.model_dir)
            self.engines.append(self.local.engine)
        return write_shard(plan, k, self.local.engine)

    def __call__(self, plan: CotsPlan, ks: list[int]) -> None:
        self.calls.append(list(ks))
        with ThreadPoolExecutor(self.n) as pool:
            list(pool.map(lambda k: self._one(plan, k), ks))


def test_thread_workers_write_the_sequential_rows(tiny: Path, prompts: Path, tmp_path: Path,
                                                  sequential: list[dict[str, Any]]) -> None:
    cfg = CFG.model_copy(update={"samples_per_prompt": 2})
    workers = ThreadWorkers(2)
    seen: list[int] = []
    s = generate_cots(prompts, tiny, cfg, tmp_path / "c", run_shards=workers, wave=5,
                      on_shard=lambda k, p: seen.append(k))
    assert workers.calls == [[0, 1, 2, 3, 4]] and len(workers.engines) == 2
    assert seen == [0, 1, 2, 3, 4] and s.shards_written == 5 and s.n_rows == 10
    rows = read_cots(tmp_path / "c").to_pylist()
    assert rows == sequential
    assert sorted(r["cot_id"] for r in rows) == sorted({f"{r['prompt_id']}/{r['sample_index']}" for r in rows})


def test_budget_cut_inside_a_wave_keeps_the_sequential_shards(tiny: Path, prompts: Path, tmp_path: Path) -> None:
    lens = [len(x) for x in pq.read_table(prompts).column("input_ids").to_pylist()]
    cfg = CFG.model_copy(update={"token_budget": lens[0] + lens[1] + 1})  # reached after shard 1
    seq = generate_cots(prompts, tiny, cfg, tmp_path / "seq")
    workers = ThreadWorkers(2)
    fan = generate_cots(prompts, tiny, cfg, tmp_path / "fan", run_shards=workers, wave=3)
    assert seq.budget_reached and fan.budget_reached and seq.n_shards == fan.n_shards == 2
    assert workers.calls == [[0, 1, 2]]  # shard 2 was written by the wave, then dropped
    assert sorted(p.name for p in (tmp_path / "fan").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert read_cots(tmp_path / "fan").to_pylist() == read_cots(tmp_path / "seq").to_pylist()


def test_a_dead_runner_leaves_whole_shards_that_a_rerun_reuses(tiny: Path, prompts: Path, tmp_path: Path,
                                                              sequential: list[dict[str, Any]]) -> None:
    cfg = CFG.model_copy(update={"samples_per_prompt": 2})
    engine: list[Any] = []

    def dies_after_two(plan: CotsPlan, ks: list[int]) -> None:
        engine.append(engine[0] if engine else open_engine(plan.cfg, plan.model_dir))
        write_shard(plan, ks[0], engine[0])
        write_shard(plan, ks[2], engine[0])  # out of order, like a worker finishing early
        raise KeyboardInterrupt("worker pool lost")

    with pytest.raises(KeyboardInterrupt):
        generate_cots(prompts, tiny, cfg, tmp_path / "c", run_shards=dies_after_two, wave=4)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["part-00000.parquet", "part-00002.parquet"]
    workers = ThreadWorkers(2)
    seen: list[int] = []
    again = generate_cots(prompts, tiny, cfg, tmp_path / "c", run_shards=workers, wave=4,
                          on_shard=lambda k, p: seen.append(k))
    assert workers.calls == [[1, 3, 4]] and seen == [1, 3, 4]
    assert again.shards_reused == 2 and again.shards_written == 3
    assert read_cots(tmp_path / "c").to_pylist() == sequential


def test_runner_that_skips_a_shard_and_bad_waves(tiny: Path, prompts: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"without writing shard\(s\) \[0, 1\]"):
        generate_cots(prompts, tiny, CFG, tmp_path / "c", run_shards=lambda plan, ks: None, wave=2)
    with pytest.raises(ValueError, match="wave must be >= 1, got 0"):
        generate_cots(prompts, tiny, CFG, tmp_path / "c", wave=0)


def test_runner_config_and_parallel_sizes() -> None:
    assert RunnerConfig().kind == "thread"
    assert RunnerConfig(kind="dask", n_workers=3).shards_per_wave(True, 10) == 3
    assert RunnerConfig(kind="dask").shards_per_wave(False, 10) == 10
    assert RunnerConfig(kind="ray", wave=4).shards_per_wave(False, 10) == 4
    with pytest.raises(ValueError, match="'tcp://x:8786': only a dask or ray runner"):
        RunnerConfig(address="tcp://x:8786")
    with pytest.raises(ValueError, match="kind"):
        RunnerConfig(kind="slurm")  # type: ignore[arg-type]
    # vLLM's parallel sizes: out of the hash while 1 (older runs keep their keys), in it otherwise
    assert "tensor_parallel_size" not in GenerateConfig().canonical()
    assert GenerateConfig(tensor_parallel_size=2).stable_hash() != GenerateConfig().stable_hash()
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        open_engine(GenerateConfig(tensor_parallel_size=2), tiny_model("llama"))


def test_run_config_runner_section() -> None:
    from rac.runs.run_config import RunConfigError, parse_run_config

    data: dict[str, Any] = {
        "model": "tiny-llama", "prompts": {"source": "gsm8k", "n": 4}, "generate": {"max_new_tokens": 16},
        "calibrations": {"rac": {"kind": "rac", "token_budget": 500}},
        "prune": [{"method": "sparsegpt", "sparsity": 0.5}],
    }
    plain = parse_run_config(data)
    assert plain.runner is None and "runner" not in plain.canonical()
    cfg = parse_run_config({**data, "runner": {"kind": "dask", "n_workers": 3}})
    assert cfg.runner == RunnerConfig(kind="dask", n_workers=3)
    assert parse_run_config(cfg.canonical()).runner == cfg.runner
    assert cfg.generate is not None and plain.generate is not None
    assert cfg.generate.stable_hash() == plain.generate.stable_hash()
    with pytest.raises(RunConfigError, match=r"unknown key 'runner.workers'.*n_workers"):
        parse_run_config({**data, "runner": {"kind": "dask", "workers": 3}})
    with pytest.raises(RunConfigError, match=r"runner.kind = 'slurm'"):
        parse_run_config({**data, "runner": {"kind": "slurm"}})


@pytest.mark.slow
def test_vllm_receives_parallel_sizes_only_above_one(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vllm = pytest.importorskip("vllm")
    from rac.data.engines import make_engine

    seen: list[dict[str, Any]] = []

    class FakeLLM:  # records the engine arguments instead of starting vLLM
        def __init__(self, **kw: Any) -> None:
            seen.append(kw)

    for var in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.setenv(var, os.environ.get(var, "1" if var != "VLLM_CPU_OMP_THREADS_BIND" else "nobind"))
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    make_engine("vllm", tiny, eos_ids=[0], pad_id=0, tensor_parallel_size=2, data_parallel_size=3)
    make_engine("vllm", tiny, eos_ids=[0], pad_id=0)
    assert (seen[0]["tensor_parallel_size"], seen[0]["data_parallel_size"]) == (2, 3)
    assert "tensor_parallel_size" not in seen[1] and "data_parallel_size" not in seen[1]
