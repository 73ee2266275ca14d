"""Group-order replay of finished sub-blocks (rac.engine.replay) against the recomputing path, bit for bit.

The reference is the same engine with the adapter's `blocks` emptied: every pass recomputes the layer from its
input, as before replay existed. Replay must give the identical pruned weights (torch.equal, not a
tolerance), also when a run is stopped mid-layer and resumed, and it must actually replay (counted).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_support import folder_tensors, random_sequences, write_calib

from rac.engine import CompressConfig, StepRecord, compress
from rac.engine.batches import plan_batches
from rac.engine.experts import ExpertConfig
from rac.engine.replay import LayerReplay
from rac.models import adapters
from rac.models.assets import tiny_model
from rac.pruners import PruneConfig

WEIGHTS = {"prompt": 0.5, "decode": 1.0, "other": 1.0}


def _cfg(**kw: Any) -> CompressConfig:
    base: dict[str, Any] = dict(prune=PruneConfig(method="sparsegpt", sparsity=0.5), act_dtype="float32",
                                compute_dtype="float32", batch_tokens=48, segment_weights=WEIGHTS)
    base.update(kw)
    return CompressConfig(**base)


SEQS = random_sequences(7, 500, [12, 16, 16, 20], seed=1)
N_BATCHES = len(plan_batches([len(ids) for ids, _ in SEQS], 48)[1])  # batch_tokens=48 below


def _calib(tmp_path: Path) -> Path:
    return write_calib(tmp_path / "calib.parquet", SEQS)


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The replay count of every layer the engine finishes (appended when its LayerReplay closes)."""
    counts: list[int] = []
    close = LayerReplay.close

    def spy(self: LayerReplay) -> None:
        counts.append(self.replays)
        close(self)

    monkeypatch.setattr(LayerReplay, "close", spy)
    return counts


def _recomputing(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """The old path: no block of `arch` is ever recorded or replayed."""
    monkeypatch.setitem(adapters.ADAPTERS, arch, dataclasses.replace(adapters.ADAPTERS[arch], blocks=()))


def _reference(tmp_path: Path, arch: str, model: Path, calib: Path, cfg: CompressConfig) -> dict[str, torch.Tensor]:
    with pytest.MonkeyPatch.context() as mp:
        _recomputing(mp, arch)
        compress(model, calib, tmp_path / "ref", cfg, tmp_path / "w-ref")
    return folder_tensors(tmp_path / "ref")


def _assert_identical(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys()
    for name, t in ref.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("arch,compute", [("llama", "float32"), ("qwen2", "float32"), ("qwen3", "float32"),
                                          ("qwen2", "bfloat16")])
def test_replay_is_bitwise_the_recomputing_path(tmp_path: Path, arch: str, compute: str,
                                                replays: list[int]) -> None:
    model, calib = tiny_model(arch), _calib(tmp_path)
    cfg = _cfg(compute_dtype=compute, act_dtype=compute)
    compress(model, calib, tmp_path / "out", cfg, tmp_path / "work")
    # per layer: attention replayed in the down_proj pass and the propagation pass, the MLP (down_proj of its
    # recorded input) in the propagation pass
    assert N_BATCHES > 1 and replays == [3 * N_BATCHES] * 2
    _assert_identical(folder_tensors(tmp_path / "out"), _reference(tmp_path, arch, model, calib, cfg))


@pytest.mark.parametrize("stop", [(0, 1), (0, 2), (1, 0), (1, 3)])
def test_resume_mid_layer_is_bitwise_the_recomputing_path(tmp_path: Path, stop: tuple[int, int]) -> None:
    model, calib, cfg = tiny_model("llama"), _calib(tmp_path), _cfg()
    first = compress(model, calib, tmp_path / "out", cfg, tmp_path / "work", stop_after=stop)
    assert not first.complete and first.next_step is not None
    second = compress(model, calib, tmp_path / "out", cfg, tmp_path / "work", start_at=first.next_step)
    assert second.complete
    _assert_identical(folder_tensors(tmp_path / "out"), _reference(tmp_path, "llama", model, calib, cfg))


def test_partial_selection_and_layer_order(tmp_path: Path, replays: list[int]) -> None:
    """Only q/k/v and down_proj pruned: the attention is final (and recorded) from the down_proj pass on; in
    layer order nothing is replayed. Both bitwise the recomputing path."""
    model, calib = tiny_model("qwen3"), _calib(tmp_path)
    cfg = _cfg(include=("*q_proj", "*k_proj", "*v_proj", "*down_proj"))
    compress(model, calib, tmp_path / "out", cfg, tmp_path / "work")
    assert replays == [2 * N_BATCHES] * 2  # attention in the propagation pass, the MLP tail too
    layer = _cfg(sequential="layer")
    steps: list[StepRecord] = []
    compress(model, calib, tmp_path / "lay", layer, tmp_path / "w-lay", on_step=steps.append)
    assert len(steps) == 8 and len(replays) == 2  # no LayerReplay in layer order
    _assert_identical(folder_tensors(tmp_path / "out"), _reference(tmp_path, "qwen3", model, calib, cfg))
    _assert_identical(folder_tensors(tmp_path / "lay"), _reference(tmp_path / "w-lay", "qwen3", model, calib, layer))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_moe_attention_replay_is_bitwise(tmp_path: Path, arch: str, replays: list[int]) -> None:
    """MoE layers replay their attention only (the sparse MoE block has no tail), also across expert chunks."""
    model, calib = tiny_model(arch), _calib(tmp_path)
    cfg = _cfg(moe=ExpertConfig(min_expert_tokens=1, experts_per_pass=3))
    compress(model, calib, tmp_path / "out", cfg, tmp_path / "work")
    assert replays and all(n > 0 for n in replays)
    _assert_identical(folder_tensors(tmp_path / "out"), _reference(tmp_path, arch, model, calib, cfg))
