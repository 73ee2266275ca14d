"""bench/gpu.py at toy size on CPU: the GPU check runs end to end and its numbers are the engine's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu


def test_gpu_check_runs_at_toy_size_on_cpu(tmp_path: Path) -> None:
    res = gpu.main(["--device", "cpu", "--toy", "--layers", "2", "--sequences", "4", "--seq-len", "32"],
                   results_dir=tmp_path)
    saved = json.loads((tmp_path / "gpu-toy.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert res["linears"] == 2 * 7 and len(res["layer_seconds"]) == 2
    assert res["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)  # SparseGPT's exact count per matrix
    assert res["calibration_tokens"] == 4 * 32 and res["peak_gpu_bytes"] is None
    assert 0 < res["solver_seconds_total"] <= res["compress_seconds"]
    speed = res["stats_vs_forward"]
    assert speed["tokens"] == 4 * 32 and speed["stats_us_per_token"] > 0 and speed["plain_us_per_token"] > 0
    assert "| statistics pass us/token |" in (tmp_path / "gpu-toy.md").read_text()


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="cuda"):
        gpu.main(["--device", "cuda", "--toy", "--layers", "1"], results_dir=tmp_path)
    assert not list(tmp_path.iterdir())
