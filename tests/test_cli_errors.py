"""A stage failing mid-run ends `rac run` with one line naming what failed and the exact resume command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rac.store.index import Index

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "configs" / "tiny.yaml"

# the calibration stage hits a full disk (injected: this machine's disk is not full)
SCRIPT = """
import errno, sys
import rac.runs.stages as stages
def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", "/mnt/full/stages/calib/x/calib.parquet")
stages.calib_step = full
from rac_prefect.flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_resumable(tmp_path: Path) -> None:
    work = tmp_path / "work"
    args = ["--work-dir", str(work), "run", str(TINY), "--run-id", "full"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=str(REPO), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "run full failed: no space left on the device holding /mnt/full/stages/calib/x/calib.parquet" in out
    assert f"continue with: rac --work-dir {work} resume full" in out
    row = Index(work).get_run("full")
    assert row is not None and row["status"] == "failed"
    done = {s["name"] for s in Index(work).run_stages("full") if s["status"] == "done"}
    assert {"prompts", "cots"} <= done  # the work before the failure is kept for the resume
