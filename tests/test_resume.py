"""Resume guards: run ids, the flock run lock across processes, model revisions, fingerprint diffs; crash tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from rac.models.streaming import model_revision
from rac.runs.session import FingerprintMismatchError, check_fingerprint, config_diff, fingerprint
from rac.runs.workdir import FileLock, RunLockedError, check_run_id, new_run_id


def _model(folder: Path, hidden: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    save_file({"w": torch.zeros(hidden, hidden)}, str(folder / "model.safetensors"))
    return folder


def test_run_ids() -> None:
    import re

    rid = new_run_id("my demo/run")
    assert check_run_id(rid) == rid and re.fullmatch(r"my-demo-run-\d{8}-\d{6}-[0-9a-f]{4}", rid), rid
    assert new_run_id("../..").startswith("run-")  # nothing safe left of the name
    for bad in ("", "../x", "a/b", "-x", "x" * 100):
        with pytest.raises(ValueError, match="run id"):
            check_run_id(bad)


def test_lock_refuses_second_holder_in_other_process(tmp_path: Path) -> None:
    lock_file = tmp_path / "run.lock"
    code = (
        "import sys, time\nfrom rac.runs.workdir import FileLock\n"
        f"l = FileLock(__import__('pathlib').Path({str(lock_file)!r}), 'run x').acquire()\n"
        "print('locked', flush=True); sys.stdin.readline()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"run x is already running \(pid {holder.pid} since"):
            FileLock(lock_file, "run x").acquire()
        assert FileLock(lock_file, "run x").is_held()
    finally:
        holder.communicate("\n")
    assert not FileLock(lock_file, "run x").is_held()
    with FileLock(lock_file, "run x"):  # released when the holder exits
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_lock_is_released_when_holder_is_killed(tmp_path: Path) -> None:
    lock_file = tmp_path / "run.lock"
    code = (
        "import os, signal\nfrom pathlib import Path\nfrom rac.runs.workdir import FileLock\n"
        f"FileLock(Path({str(lock_file)!r}), 'run x').acquire()\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    FileLock(lock_file, "run x").acquire().release()  # the kernel dropped the dead holder's flock


def test_model_revision_tracks_config_and_weights_layout(tmp_path: Path) -> None:
    a = _model(tmp_path / "a")
    b = _model(tmp_path / "b")
    assert model_revision(a) == model_revision(b)
    _model(tmp_path / "b", hidden=8)
    assert model_revision(a) != model_revision(b)
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_revision(tmp_path / "c")


def test_fingerprint_mismatch_names_what_differs(tmp_path: Path) -> None:
    cfg = {"prune": [{"sparsity": 0.5}], "generate": {"max_tokens": 64}}
    a = _model(tmp_path / "a")
    fp = fingerprint(a, cfg)
    check_fingerprint("r", fp, cfg, fingerprint(a, cfg), cfg)  # same: fine
    new_cfg = {"prune": [{"sparsity": 0.6}], "generate": {"max_tokens": 64}}
    assert config_diff(cfg, new_cfg) == ["prune: [{'sparsity': 0.5}] -> [{'sparsity': 0.6}]"]
    with pytest.raises(FingerprintMismatchError, match=r"config differs: prune: .*0\.5.* -> .*0\.6"):
        check_fingerprint("r", fp, cfg, fingerprint(a, new_cfg), new_cfg)
    b = _model(tmp_path / "b", hidden=8)
    with pytest.raises(FingerprintMismatchError, match="model revision differs"):
        check_fingerprint("r", fp, cfg, fingerprint(b, cfg), cfg)


# ---------------------------------------------------------------------------------------------------------
# Crash tests of the pruning stage: a child process is SIGKILLed at a named point, the stage is resumed in
# this process, and the final model must equal (bitwise) the one of an uninterrupted run.
# Children fork from a forkserver that imported torch/rac once (it never computes), so each costs ~1 s.

CRASH_SCENARIOS: dict[str, dict[str, Any]] = {
    # mid-statistics: the 2nd Hessian update of layer 1's first group
    "mid-statistics": {"kill_add_after": ("prune.row:0:3", 2)},
    # after layer 0's last group is pruned and persisted (next boundary activations included), before its row
    "pruned-before-row": {"env": {"RAC_CRASH_AT": "prune.step:0:3"}},
    # while a checkpoint shard is written: the temp file is half written when the process dies
    "torn-shard": {"kill_replace": "step-00001-1.safetensors"},
}


def _tiny_calibration(folder: Path) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rac.data.segments import CALIB_SCHEMA

    rng = np.random.default_rng(0)
    rows = [{"seq_id": i, "source": "test", "input_ids": rng.integers(5, 500, 24).tolist(),
             "segment": [0] * 8 + [1] * 16} for i in range(6)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "calib.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CALIB_SCHEMA), str(path))
    return path


def _prune_setup(work: Path) -> tuple[Any, Any, Any]:
    from rac.engine import CompressConfig
    from rac.models.assets import tiny_model
    from rac.pruners.base import PruneConfig
    from rac.runs.memo import StageOutput
    from rac.runs.run_config import PruneJob
    from rac.runs.workdir import RunRef
    from rac.store.artifacts import ArtifactRef
    from rac.store.index import Index

    model = tiny_model("llama")
    env = RunRef(str(work), "r1", str(model), model_revision(model))
    if Index(work).get_run("r1") is None:
        Index(work).create_run("r1", "test", {}, {}, "", 1)
    calib_path = work / "calib" / "calib.parquet"
    if not calib_path.exists():
        _tiny_calibration(calib_path.parent)
    calib = StageOutput("calib/t", "calib", "ck", (ArtifactRef.of(calib_path, "calibration"),))
    cfg = CompressConfig(prune=PruneConfig(method="sparsegpt", sparsity=0.5), act_dtype="float32",
                         compute_dtype="float32")
    return env, PruneJob("t-sparsegpt-50pct", "t", cfg), calib


def _crash_child(work: str, scenario: str) -> None:
    """Runs in a forked child: arm the kill of `scenario`, then prune (the child never returns normally)."""
    import os as _os
    import signal as _signal

    from rac.pruners import stats
    from rac.runs import resume
    from rac.runs import stages as steps

    spec = CRASH_SCENARIOS[scenario]
    _os.environ.update(spec.get("env", {}))
    if "kill_add_after" in spec:
        point, nth = spec["kill_add_after"]
        armed = {"on": False, "n": 0}
        real_add, real_crashpoint = stats.HessianAccumulator.add, resume.crashpoint

        def add(self: Any, *a: Any, **k: Any) -> None:
            armed["n"] += armed["on"]
            if armed["on"] and armed["n"] >= nth:
                _os.kill(_os.getpid(), _signal.SIGKILL)
            real_add(self, *a, **k)

        def crashpoint(name: str) -> None:
            armed["on"] = armed["on"] or name == point
            real_crashpoint(name)

        stats.HessianAccumulator.add = add  # type: ignore[method-assign]
        resume.crashpoint = crashpoint  # type: ignore[assignment]
    if "kill_replace" in spec:
        real_replace = _os.replace

        def replace(src: Any, dst: Any) -> None:
            if str(dst).endswith(spec["kill_replace"]):
                size = Path(src).stat().st_size
                with open(src, "r+b") as fh:
                    fh.truncate(size // 2)
                _os.kill(_os.getpid(), _signal.SIGKILL)
            real_replace(src, dst)

        _os.replace = replace  # type: ignore[assignment]
    env, job, calib = _prune_setup(Path(work))
    steps.prune_step(env, job, calib, log=lambda m: None)


def _model_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def forkserver() -> Any:
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "rac.runs.stages", "rac.engine", "test_resume"])
    return ctx


LAYER_FIELDS = ("layer", "group", "linear", "sparsity", "rel_error", "loss", "damp", "retries")


def _layer_values(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a layer row says about the pruning (not when, how fast or in which run). The float fields are
    float32 reductions whose last bits depend on the thread split of the process (the pruned weights
    themselves are compared bitwise), so they compare to 1e-5 relative."""
    return [tuple(pytest.approx(v, rel=1e-5) if isinstance(v, float) else v for v in (r[f] for f in LAYER_FIELDS))
            for r in rows]


@pytest.fixture(scope="module")
def reference_prune(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted prune: its stage key, model tensors and layer rows."""
    from rac.runs import stages as steps
    from rac.store.index import Index

    work = tmp_path_factory.mktemp("reference")
    env, job, calib = _prune_setup(work)
    out = steps.prune_step(env, job, calib, log=lambda m: None)
    assert not out.reused and out.summary["start_at"] is None
    rows = Index(work).layer_rows(out.stage_key)
    assert len(rows) == 2 * 7  # 2 layers x 7 linears (q, k, v, o, gate, up, down)
    return {"key": out.stage_key, "tensors": _model_tensors(out.output("model").path), "layers": _layer_values(rows),
            "n_steps": len(Index(work).steps(out.stage_key))}


def _same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(CRASH_SCENARIOS))
def test_killed_prune_resumes_to_identical_model(scenario: str, tmp_path: Path, forkserver: Any,
                                                reference_prune: dict[str, Any]) -> None:
    from rac.runs import stages as steps
    from rac.store.index import Index

    proc = forkserver.Process(target=_crash_child, args=(str(tmp_path), scenario))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == -9, f"child was not killed at {scenario}: exit {proc.exitcode}"
    env, job, calib = _prune_setup(tmp_path)
    key = steps.prune_key(env, job, calib)
    assert key == reference_prune["key"]  # the same stage as the uninterrupted one
    recorded = [(s[0], s[1]) for s in Index(tmp_path).steps(key)]
    assert recorded and recorded[-1] < (1, 3), recorded  # it died mid-way
    logs: list[str] = []
    out = steps.prune_step(env, job, calib, log=logs.append)
    assert not out.reused and out.summary["start_at"] is not None, logs  # continued, not restarted
    assert tuple(out.summary["start_at"]) == (recorded[-1][0], recorded[-1][1] + 1) or \
        tuple(out.summary["start_at"]) == (recorded[-1][0] + 1, 0)
    assert _same_tensors(_model_tensors(out.output("model").path), reference_prune["tensors"])
    # every linear recorded once, with the values of the uninterrupted run (rows of the dead child included)
    assert _layer_values(Index(tmp_path).layer_rows(key)) == reference_prune["layers"]
    assert len(Index(tmp_path).steps(key)) == reference_prune["n_steps"]
    assert not (out.output("model").path.parent / "work").exists()  # checkpoints dropped once recorded


@pytest.mark.slow
def test_corrupt_checkpoint_and_output_are_recomputed(tmp_path: Path, forkserver: Any,
                                                      reference_prune: dict[str, Any]) -> None:
    from rac.runs import stages as steps
    from rac.store.index import Index

    proc = forkserver.Process(target=_crash_child, args=(str(tmp_path), "torn-shard"))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == -9
    env, job, calib = _prune_setup(tmp_path)
    key = steps.prune_key(env, job, calib)
    ck = env.stage_dir("prune", key) / "work" / "engine" / "step-00001-0.safetensors"
    data = bytearray(ck.read_bytes())
    data[-1] ^= 0xFF  # flip one weight byte: same size, different hash
    ck.write_bytes(bytes(data))
    logs: list[str] = []
    out = steps.prune_step(env, job, calib, log=logs.append)
    assert tuple(out.summary["start_at"]) == (1, 0), logs  # (1, 0) not trusted: redone from there
    assert any("step (1, 0) not trusted" in m for m in logs)
    assert _same_tensors(_model_tensors(out.output("model").path), reference_prune["tensors"])
    # a finished output whose bytes change is not reused: the stage is recomputed (from scratch)
    shard = sorted(out.output("model").path.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    logs.clear()
    again = steps.prune_step(env, job, calib, log=logs.append)
    assert not again.reused and any("not trusted" in m for m in logs)
    assert _same_tensors(_model_tensors(again.output("model").path), reference_prune["tensors"])
    assert steps.prune_step(env, job, calib, log=logs.append).reused
    assert len(Index(tmp_path).steps(key)) == reference_prune["n_steps"] == 8  # 2 layers x 4 groups
    assert _layer_values(Index(tmp_path).layer_rows(key)) == reference_prune["layers"]
