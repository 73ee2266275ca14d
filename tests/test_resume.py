"""Resume guards: run ids, the flock run lock across processes, model revisions, fingerprint diffs; crash tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rac.run import (
    FileLock,
    FingerprintMismatchError,
    RunLockedError,
    check_fingerprint,
    check_run_id,
    config_diff,
    fingerprint,
    model_revision,
    new_run_id,
)


def _model(folder: Path, hidden: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    save_file({"w": torch.zeros(hidden, hidden)}, str(folder / "model.safetensors"))
    return folder


def test_run_ids() -> None:
    rid = new_run_id("my demo/run")
    assert check_run_id(rid) == rid and rid.startswith("my-demo-run-")
    for bad in ("", "../x", "a/b", "-x", "x" * 100):
        with pytest.raises(ValueError, match="run id"):
            check_run_id(bad)


def test_lock_refuses_second_holder_in_other_process(tmp_path: Path) -> None:
    lock_file = tmp_path / "run.lock"
    code = (
        "import sys, time\nfrom rac.run import FileLock\n"
        f"l = FileLock(__import__('pathlib').Path({str(lock_file)!r}), 'run x').acquire()\n"
        "print('locked', flush=True); sys.stdin.readline()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"run x is already running \(pid {holder.pid} since"):
            FileLock(lock_file, "run x").acquire()
    finally:
        holder.communicate("\n")
    with FileLock(lock_file, "run x"):  # released when the holder exits
        assert json.loads(lock_file.read_text())["pid"] > 0


def test_lock_is_released_when_holder_is_killed(tmp_path: Path) -> None:
    lock_file = tmp_path / "run.lock"
    code = (
        "import os, signal\nfrom pathlib import Path\nfrom rac.run import FileLock\n"
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
