"""Data-parallel statistics (rac.engine.distributed) against the single-process engine.

`torchrun --nproc_per_node 2` with gloo on CPU must give the same pruned weights (fp32 allclose, same
masks) as `compress` in one process; a run stopped mid-way resumes per rank from the shared step records
and each rank's own activation stores. The rank split itself is checked in process (no torchrun).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_support import random_sequences, write_calib
from safetensors.torch import load_file

from rac.engine import CompressConfig, compress
from rac.engine.batches import load_calibration
from rac.engine.distributed import DistContext
from rac.engine.torchrun import dist_resume_point as resume_point
from rac.models.assets import tiny_model
from rac.pruners import PruneConfig

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = {"prompt": 0.5, "decode": 1.0, "other": 1.0}


def _cfg(method: str) -> CompressConfig:
    return CompressConfig(prune=PruneConfig(method=method, sparsity=0.5), act_dtype="float32",
                          compute_dtype="float32", batch_tokens=48, segment_weights=WEIGHTS)


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(model: Path, calib: Path, out: Path, cfg: CompressConfig, work: Path, *extra: str) -> dict:
    (work.parent / "cfg.json").write_text(json.dumps(cfg.canonical()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "rac.engine.torchrun", str(model), str(calib), str(out),
           "--config", str(work.parent / "cfg.json"), "--work-dir", str(work), "--backend", "gloo", *extra]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _assert_same(single: dict[str, torch.Tensor], dp: dict[str, torch.Tensor]) -> None:
    assert single.keys() == dp.keys()
    pruned = [k for k in single if k.endswith("_proj.weight")]
    assert pruned and all(float((single[k] == 0).float().mean()) == pytest.approx(0.5, abs=0.02) for k in pruned)
    for name in single:
        assert torch.equal(single[name] == 0, dp[name] == 0), name  # same masks
        torch.testing.assert_close(dp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_torchrun_gloo_two_ranks_equals_single_process(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    calib = write_calib(tmp_path / "calib.parquet", random_sequences(7, 500, [12, 16, 16, 20], seed=1))
    cfg = _cfg("sparsegpt")
    compress(model, calib, tmp_path / "single", cfg, tmp_path / "w1")
    # a first torchrun stops after (1, 1); the second resumes there on both ranks
    first = _torchrun(model, calib, tmp_path / "dp", cfg, tmp_path / "w2", "--stop-after", "1,1")
    assert first["complete"] is False and first["world"] == 2 and first["start_at"] is None
    ranks = sorted(p.name for p in (tmp_path / "w2" / "engine").glob("rank-*"))
    assert ranks == ["rank-000", "rank-001"]
    assert all((tmp_path / "w2" / "engine" / r / "acts-00001.bin").is_file() for r in ranks)
    second = _torchrun(model, calib, tmp_path / "dp", cfg, tmp_path / "w2")
    assert second["complete"] is True and second["start_at"] == [1, 2]
    assert second["n_tokens"] == sum(len(ids) for ids, _ in random_sequences(7, 500, [12, 16, 16, 20], seed=1))
    _assert_same(_weights(tmp_path / "single"), _weights(tmp_path / "dp"))
    prov = json.loads((tmp_path / "dp" / "rac_provenance.json").read_text())
    assert json.loads((tmp_path / "single" / "rac_provenance.json").read_text())["calibration"] == prov["calibration"]


def test_ranks_split_sequences_and_keep_the_batch_invariants(tmp_path: Path) -> None:
    seqs = random_sequences(9, 500, [5, 9, 14], seed=3)
    calib = load_calibration(write_calib(tmp_path / "c.parquet", seqs), 500, 64, batch_tokens=30)
    parts = [DistContext(r, 3).shard(calib, 30) for r in range(3)]
    assert sum(p.n_tokens for p in parts) == calib.n_tokens
    for r, part in enumerate(parts):
        want = [seqs[i][0] for i in range(r, 9, 3)]
        assert [x.tolist() for x in part.input_ids] == want and part.sha256 == calib.sha256
        assert sum(b.n_tokens for b in part.batches) == part.n_tokens
        assert all(len(b.rows) * b.seq_len <= 30 or len(b.rows) == 1 for b in part.batches)
    with pytest.raises(ValueError, match="rank 3 gets no sequences"):
        DistContext(3, 4).shard(load_calibration(write_calib(tmp_path / "d.parquet", seqs[:3]), 500, 64, 30), 30)
    with pytest.raises(ValueError, match="rank 2 outside world of size 2"):
        DistContext(2, 2)


@pytest.fixture()
def world_of_one() -> Iterator[DistContext]:
    """A one-process gloo group in this process (torn down after the test)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield DistContext(0, 1)
    finally:
        dist.destroy_process_group()


def test_one_rank_is_bitwise_the_single_process_engine(tmp_path: Path, world_of_one: DistContext) -> None:
    model = tiny_model("llama")
    calib = write_calib(tmp_path / "calib.parquet", random_sequences(5, 500, [10, 14], seed=4))
    cfg = _cfg("wanda")
    compress(model, calib, tmp_path / "single", cfg, tmp_path / "w1")
    res = compress(model, calib, tmp_path / "dp", cfg, tmp_path / "w2", dist=world_of_one)
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "dp")
    assert res.complete and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "w2" / "engine" / "rank-000" / "acts-00002.bin").exists()  # final store freed


def test_resume_point_needs_records_and_every_ranks_inputs(tmp_path: Path, world_of_one: DistContext) -> None:
    model = tiny_model("llama")  # 2 layers x 4 groups
    calib = write_calib(tmp_path / "calib.parquet", random_sequences(4, 500, [10], seed=5))
    work = tmp_path / "w"
    assert resume_point(world_of_one, work, 2, 4) is None  # nothing there
    compress(model, calib, tmp_path / "out", _cfg("wanda"), work, stop_after=(1, 0), dist=world_of_one)
    assert resume_point(world_of_one, work, 2, 4) == (1, 1)
    (work / "engine" / "rank-000" / "acts-00001.bin").unlink()  # this rank lost its layer-1 inputs
    assert resume_point(world_of_one, work, 2, 4) is None
