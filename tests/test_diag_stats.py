"""Diagonal statistics for Wanda and magnitude: DiagAccumulator against brute force, prune_diag against the
full-H pruners, the method-dependent defaults of CompressConfig, and the engine on diag vs full statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_support import folder_tensors, random_sequences, write_calib

from rac.data.segments import SEGMENT_IDS
from rac.engine import CompressConfig, StepRecord, compress
from rac.models.assets import tiny_model
from rac.pruners import PruneConfig, prune
from rac.pruners.error import reconstruction_loss
from rac.pruners.stats import DiagAccumulator, HessianAccumulator
from rac.pruners.wanda import diag_energy, prune_diag

D = 10


def _batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 4 + i, D, generator=g), torch.randint(0, 3, (2, 4 + i), generator=g),
             torch.rand(2, 4 + i, generator=g) > 0.25) for i in range(4)]


@pytest.mark.parametrize("weights", [None, {"prompt": 0.5, "decode": 2.0}])
def test_diag_accumulator_is_the_sum_of_squares(weights: dict[str, float] | None) -> None:
    diag, full = DiagAccumulator(D), HessianAccumulator(D)
    rows, wts = [], []
    for x, seg, mask in _batches(0):
        diag.add(x, seg, mask)
        full.add(x, seg, mask)
        keep = mask.reshape(-1)
        rows.append(x.reshape(-1, D)[keep].double())
        w = weights or {n: 1.0 for n in SEGMENT_IDS}
        wts.append(torch.tensor([w.get(n, 0.0) for n in SEGMENT_IDS], dtype=torch.float64)[seg.reshape(-1)[keep]])
    ref = (torch.cat(wts)[:, None] * torch.cat(rows).square()).sum(0)  # brute force, float64
    torch.testing.assert_close(diag.hessian(weights).double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(diag.hessian(weights), full.hessian(weights).diagonal(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diag.col_norms(weights), full.col_norms(weights), rtol=1e-5, atol=1e-5)
    assert torch.equal(diag.counts, full.counts) and diag.state()["hessians"].shape == (3, D)


@pytest.mark.parametrize("method,nm", [("wanda", None), ("wanda", (2, 4)), ("magnitude", None)])
def test_prune_diag_masks_equal_the_full_h_pruners(method: str, nm: tuple[int, int] | None) -> None:
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(12, 16, generator=g), torch.randn(64, 16, generator=g) * torch.linspace(0.1, 3, 16)
    H = X.T @ X
    cfg = PruneConfig(method=method, nm=nm) if nm else PruneConfig(method=method, sparsity=0.5)
    full, diag = prune(W, H, cfg), prune_diag(W, H.diagonal().clone(), cfg)
    assert torch.equal(diag.mask, full.mask) and torch.equal(diag.weight, full.weight)
    dW = W - diag.weight
    assert diag.loss == pytest.approx(float((dW.double() ** 2 * H.diagonal().double()).sum()), rel=1e-5)
    assert diag_energy(W, H.diagonal()) == pytest.approx(float((W.double() ** 2 @ H.diagonal().double()).sum()), rel=1e-5)
    assert full.loss == pytest.approx(reconstruction_loss(W, full.weight, H), rel=1e-5)  # the full one differs
    with pytest.raises(ValueError, match="needs the full H"):
        prune_diag(W, H.diagonal(), PruneConfig(method="sparsegpt", sparsity=0.5))
    with pytest.raises(ValueError, match=">= 0"):
        prune_diag(W, -H.diagonal(), cfg)


def test_method_dependent_defaults() -> None:
    wanda = CompressConfig(prune=PruneConfig(method="wanda", sparsity=0.5))
    sgpt = CompressConfig(prune=PruneConfig(method="sparsegpt", sparsity=0.5))
    assert (wanda.order, wanda.diag_statistics) == ("layer", True)
    assert (sgpt.order, sgpt.diag_statistics) == ("group", False)
    assert "statistics" not in sgpt.canonical() and CompressConfig.model_validate(wanda.canonical()) == wanda
    given = CompressConfig(prune=PruneConfig(method="wanda", sparsity=0.5), sequential="group", statistics="full")
    assert (given.order, given.diag_statistics) == ("group", False)
    with pytest.raises(ValueError, match="serves only"):
        CompressConfig(prune=PruneConfig(method="sparsegpt", sparsity=0.5), statistics="diag")


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_engine_on_diag_statistics_equals_full(tmp_path: Path, method: str) -> None:
    """The same masks and weights from diag-only as from full statistics; the loss reported under diag H."""
    model = tiny_model("llama")
    calib = write_calib(tmp_path / "c.parquet", random_sequences(6, 500, [12, 16, 20], seed=2))
    out: dict[str, dict[str, torch.Tensor]] = {}
    recs: dict[str, list[StepRecord]] = {}
    for stats in ("diag", "full"):
        cfg = CompressConfig(prune=PruneConfig(method=method, sparsity=0.5), act_dtype="float32",
                             compute_dtype="float32", batch_tokens=48, statistics=stats)
        assert cfg.order == "layer"
        recs[stats] = []
        compress(model, calib, tmp_path / stats, cfg, tmp_path / f"w-{stats}", on_step=recs[stats].append)
        out[stats] = folder_tensors(tmp_path / stats)
    for name, t in out["full"].items():
        if name.endswith("_proj.weight"):
            assert torch.equal(out["diag"][name] == 0, t == 0), name  # masks
            torch.testing.assert_close(out["diag"][name], t, rtol=0, atol=0, msg=name)
    diag_lin = [lin for r in recs["diag"] for lin in r.linears]
    assert diag_lin and all(0 < lin.rel_error < 1 and lin.loss > 0 for lin in diag_lin)
