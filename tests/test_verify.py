"""`rac verify` re-hashes what the index vouches for; a run killed during start-up is resumable (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from workdirs import calibration_stages

from rac.runs import stages as steps
from rac.store.index import Index
from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "configs" / "tiny.yaml"


def _flip(path: Path) -> None:
    """Flip one byte in the middle of a file (size and name unchanged)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def work(tmp_path: Path) -> dict[str, Any]:
    """prompts -> CoTs -> rac calibration -> one pruned model, run through the stage steps (no Prefect)."""
    built = calibration_stages(tmp_path, "v")
    calib = built["calib"]["rac"]
    job = next(j for j in built["cfg"].jobs if j.calibration == "rac")
    pruned = steps.prune_step(built["env"], job, calib, log=lambda m: None)
    return {"dir": tmp_path, "cots": built["cots"], "calib": calib, "pruned": pruned, "job": job}


def test_verify_finds_a_flipped_byte_in_cots_calibration_and_model(work: dict[str, Any],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    wd = str(work["dir"])
    assert main(["--work-dir", wd, "verify"]) == EXIT_OK
    assert "4 artifact(s) of 4 completed stage(s) checked: all match" in capsys.readouterr().out
    shard = sorted(work["cots"].output("cots").path.glob("part-*.parquet"))[0]
    model_file = sorted(work["pruned"].output("model").path.glob("*.safetensors"))[0]
    for path in (shard, work["calib"].output("calibration").path, model_file):
        _flip(path)
    assert main(["--work-dir", wd, "verify", "v"]) == EXIT_FAILED
    out = capsys.readouterr().out
    changed = [line for line in out.splitlines() if line.startswith("changed")]
    assert len(changed) == 3 and "3 changed" in out
    assert {line.split()[1] for line in changed} == {"cots", "calib/rac", f"prune/{work['job'].label}"}
    assert "prompts" not in {line.split()[1] for line in changed}  # the untouched one still matches
    assert main(["--work-dir", wd, "verify", "nope"]) == EXIT_BAD_INPUT
    assert main(["--work-dir", str(work["dir"] / "empty"), "verify"]) == EXIT_BAD_INPUT


@pytest.mark.slow
def test_run_killed_during_startup_resumes_to_the_same_models(tmp_path: Path) -> None:
    env = {**os.environ, "RAC_CRASH_AT": "cli.registered"}
    cmd = [sys.executable, "-m", "rac_prefect.flows.cli", "--work-dir", str(tmp_path / "a"), "run", str(TINY),
           "--run-id", "s"]
    killed = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    row = Index(tmp_path / "a").get_run("s")
    assert row is not None and row["status"] == "starting"  # killed before Prefect started: resumable
    assert not (tmp_path / "a" / "stages").exists()
    assert main(["--work-dir", str(tmp_path / "a"), "status"]) == EXIT_OK
    assert main(["--work-dir", str(tmp_path / "a"), "resume", "s"]) == EXIT_OK
    assert main(["--work-dir", str(tmp_path / "b"), "run", str(TINY), "--run-id", "s"]) == EXIT_OK
    a, b = Index(tmp_path / "a"), Index(tmp_path / "b")
    assert a.get_run("s")["status"] == "done"  # type: ignore[index]
    done_a = {s["name"]: s["stage_key"] for s in a.run_stages("s")}
    done_b = {s["name"]: s["stage_key"] for s in b.run_stages("s")}
    assert done_a.keys() == done_b.keys() and len(done_a) > 5
    for name in ("prompts", "cots", "calib/prompt", "calib/rac", "prompts/eval"):
        assert done_a[name] == done_b[name], name  # same inputs, configs and model
    for name, key in done_a.items():  # the calibration files name their work dir, so later keys differ:
        if name.startswith("prune/"):  # compare the pruned weights themselves
            ta, tb = (_tensors(idx.done_stages(k)[0]["outputs"][0].path) for idx, k in ((a, key), (b, done_b[name])))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[t], tb[t]) for t in ta), name


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_a_finished_prune_keeps_its_layer_rows_but_no_checkpoint_rows(work: dict[str, Any]) -> None:
    from rac.store.artifacts import sha256_file

    key = work["pruned"].stage_key
    index = Index(work["dir"])
    _, rows = index.query("select count(*) from artifacts where stage_key = ? and layer is not null", [key])
    assert rows == [(0,)]  # the checkpoint files are gone, so are their rows: nothing dangles
    assert len(index.layer_rows(key)) == 2 * 7  # 2 layers x 7 linears of the tiny model
    # the calibration names its inputs by content, so the same inputs give the same file anywhere
    calib = work["calib"].output("calibration").path
    again = calibration_stages(work["dir"] / "elsewhere", "w")["calib"]["rac"]
    assert sha256_file(again.output("calibration").path) == sha256_file(calib)
    assert again.stage_key == work["calib"].stage_key
