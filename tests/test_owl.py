"""OWL non-uniform sparsity: the pure allocation and outlier-ratio functions against hand values and brute
force, the prune-entry switch (validation, unchanged keys, label), and the engine end to end on a tiny model
(per-layer sparsity of the folder = the allocation, ratios = an in-memory dense reference, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_support import _collect, folder_tensors, random_sequences, write_calib

import rac.engine.allocation as allocation_mod
import rac.pruners.owl as owl
from rac.engine import CompressConfig, compress
from rac.engine.allocation import check_allocation
from rac.models.assets import tiny_model
from rac.pruners import PruneConfig
from rac.pruners.masks import n_pruned
from rac.pruners.owl import AllocationConfig, outlier_ratio, owl_sparsities

RAC_WEIGHTS = {"prompt": 0.5, "decode": 1.0, "other": 1.0}
PROMPT_ONLY = {"prompt": 1.0, "decode": 0.0}
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def test_owl_sparsities_hand_case() -> None:
    """ratios 1, 2, 4, λ = 0.1, S = 0.5: n = 0.2 (D - 1) / 3 = 0, 1/15, 1/5; mean(n) = 4/45; S_l = S + mean(n) - n_l."""
    got = owl_sparsities([1.0, 2.0, 4.0], 0.5, 0.1)
    want = (0.5 + 4 / 45, 0.5 + 4 / 45 - 1 / 15, 0.5 + 4 / 45 - 1 / 5)
    assert got == pytest.approx(want, abs=1e-15)
    assert owl_sparsities([3.0, 3.0, 3.0], 0.6, 0.08) == (0.6, 0.6, 0.6)  # no spread in the ratios
    assert owl_sparsities([0.01], 0.5, 0.08) == (0.5,)


@pytest.mark.parametrize("seed", range(5))
def test_owl_sparsities_mean_bounds_monotone(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ratios = rng.gamma(2.0, 0.01, size=int(rng.integers(2, 40))).tolist()
    target, lam = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.01, 0.1))
    s = owl_sparsities(ratios, target, lam)
    assert math.fsum(s) / len(s) == pytest.approx(target, abs=1e-12)  # the mean is the target
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)  # spread 2λ
    assert all(target - 2 * lam - 1e-12 <= x <= target + 2 * lam + 1e-12 for x in s)
    order = np.argsort(ratios)
    assert all(s[order[i]] >= s[order[i + 1]] for i in range(len(s) - 1))  # more outliers: sparser never
    assert s[int(np.argmax(ratios))] == pytest.approx(min(s)) and s[int(np.argmin(ratios))] == pytest.approx(max(s))


def test_owl_sparsities_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least one layer ratio"):
        owl_sparsities([], 0.5, 0.08)
    with pytest.raises(ValueError, match="finite and >= 0, got -0.1"):
        owl_sparsities([0.2, -0.1], 0.5, 0.08)
    with pytest.raises(ValueError, match=r"lam=0.08 .* \[-0.06, 0.26\] around target 0.1.*use lam <= 0.05"):
        owl_sparsities([0.1, 0.2], 0.1, 0.08)
    with pytest.raises(ValueError, match="lam must be finite and > 0, got 0.0"):
        owl_sparsities([0.1, 0.2], 0.5, 0.0)


def _brute_ratio(weights: list[torch.Tensor], diags: list[torch.Tensor], M: float) -> float:
    """All scores of the layer concatenated in float64, the threshold M x their mean, the share above it."""
    scores = torch.cat([(W.double().abs() * d.double().sqrt()[None, :]).flatten() for W, d in zip(weights, diags, strict=True)])
    return float((scores > M * scores.mean()).double().mean())


@pytest.mark.parametrize("M", [2.0, 5.0, 9.0])
def test_outlier_ratio_against_brute_force(M: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(owl, "SCORE_ROWS", 7)  # several row chunks per weight
    g = torch.Generator().manual_seed(int(M))
    shapes = [(24, 16), (24, 16), (16, 24), (40, 16)]
    weights = [torch.distributions.StudentT(2.0).sample(s) for s in shapes]  # heavy tails: outliers exist
    diags = [torch.rand(s[1], generator=g) ** 4 * 10 for s in shapes]
    got = outlier_ratio(weights, diags, M)
    assert got == pytest.approx(_brute_ratio(weights, diags, M), abs=1e-12) and 0 < got < 0.5
    assert outlier_ratio(weights, [d * 9.0 for d in diags], M) == got  # one scale for the layer: same ratio
    assert outlier_ratio([w.to(torch.bfloat16) for w in weights], diags, M) == pytest.approx(
        _brute_ratio([w.to(torch.bfloat16) for w in weights], diags, M), abs=1e-12)
    with pytest.raises(ValueError, match="one diag per weight"):
        outlier_ratio(weights, diags[:2], M)
    with pytest.raises(ValueError, match=r"weight 1: diag must be \[16\]"):
        outlier_ratio(weights[:2], [diags[0], diags[2]], M)
    with pytest.raises(ValueError, match="finite and >= 0"):
        outlier_ratio(weights[:1], [-diags[0]], M)


def test_prune_entry_switch_validation_keys_and_label() -> None:
    base = PruneConfig(method="sparsegpt", sparsity=0.5)
    assert "allocation" not in base.canonical() and "allocation" not in CompressConfig(prune=base).canonical()
    # hashes from before the switch (an explicit order: a config naming none takes the method's default order)
    assert base.stable_hash() == "2aab0e063b1f"
    assert CompressConfig(prune=base, sequential="group").stable_hash() == "218e4831a31b"
    # quantized configs: every hash changed on purpose with the quant grid option (QuantSpec.grid is always in
    # canonical(), default "full"), so no stage cached under the old max|w| / q_max grid is reused under either grid
    assert PruneConfig(method="gptq", bits=4).stable_hash() == "e6f3acd81e98"  # was 8c3dc5b62e80 before the option
    assert PruneConfig(method="gptq", bits=4, grid="qmax").stable_hash() not in ("8c3dc5b62e80", "e6f3acd81e98")
    o = PruneConfig(method="sparsegpt", sparsity=0.5, allocation={"kind": "owl", "M": 5, "lam": 0.08})
    assert o == PruneConfig(method="sparsegpt", sparsity=0.5, allocation="owl")  # type: ignore[arg-type]
    assert o.canonical()["allocation"] == {"kind": "owl", "M": 5.0, "lam": 0.08} and o.stable_hash() != base.stable_hash()
    assert (base.allocation.label, o.allocation.label) == ("", "owl")
    assert AllocationConfig(kind="owl", M=7, lam=0.1).label == "owl-m7-l0.1"
    PruneConfig(method="sparsegpt", sparsity=0.5, quant={"bits": 4}, allocation="owl")  # joint mode: fine
    PruneConfig(method="wanda", sparsity=0.6, allocation="owl")
    for kwargs, msg in [
        ({"method": "sparsegpt", "nm": [2, 4]}, r"does not combine with nm=\[2, 4\]"),
        ({"method": "gptq", "bits": 4}, "method='gptq' with sparsity=0.0 prunes nothing"),
        ({"method": "sparsegpt", "sparsity": 0.1}, r"lam=0.08 .* around target 0.1"),
        ({"method": "sparsegpt", "sparsity": 0.9}, r"around target 0.9, outside \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=msg):
            PruneConfig(**kwargs, allocation="owl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="M=5.0 / lam=0.1 apply to kind 'owl' only"):
        AllocationConfig(kind="uniform", lam=0.1)
    with pytest.raises(ValueError, match="allocation.M must be finite and > 0, got -1.0"):
        AllocationConfig(kind="owl", M=-1)
    with pytest.raises(ValueError, match="data-parallel"):
        check_allocation(o, moe=False, distributed=True)
    check_allocation(base, moe=True, distributed=True)  # uniform: nothing to refuse


def _cfg(method: str = "sparsegpt", weights: dict[str, float] | None = None, allocation: str = "owl",
         sparsity: float = 0.5) -> CompressConfig:
    return CompressConfig(prune=PruneConfig(method=method, sparsity=sparsity, allocation=allocation),  # type: ignore[arg-type]
                          act_dtype="float32", compute_dtype="float32", batch_tokens=48,
                          segment_weights=weights or RAC_WEIGHTS)


@pytest.fixture(scope="module")
def four_layers() -> Path:
    return tiny_model("qwen3", num_hidden_layers=4)


def _reference_ratios(model_dir: Path, seqs: list, weights: dict[str, float], M: float) -> list[float]:
    """Outlier ratios from full-model forwards of the dense model (hooks on every linear, in memory)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = {0: "prompt", 1: "decode", 2: "other"}
    segments = tuple(names[s] for s in sorted({x for _, seg in seqs for x in seg}))
    w = {k: v for k, v in weights.items() if k in segments}
    mods = dict(model.named_modules())
    out = []
    for layer in range(model.config.num_hidden_layers):
        full = [f"model.layers.{layer}.{r}" for r in LINEARS]
        accs = _collect(model, full, seqs, segments)
        out.append(_brute_ratio([mods[n].weight.data for n in full],
                                [torch.diagonal(accs[n].hessian(w)) for n in full], M))
    return out


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_engine_prunes_each_layer_to_its_allocation(tmp_path: Path, four_layers: Path, method: str) -> None:
    seqs = random_sequences(6, 500, [12, 16, 20], seed=4)
    calib = write_calib(tmp_path / "c.parquet", seqs)
    cfg = _cfg(method)
    res = compress(four_layers, calib, tmp_path / "out", cfg, tmp_path / "work")
    alloc = res.allocation
    assert alloc is not None and [a.layer for a in alloc.layers] == [0, 1, 2, 3]
    ratios = [a.ratio for a in alloc.layers]
    assert ratios == pytest.approx(_reference_ratios(four_layers, seqs, RAC_WEIGHTS, 5.0), abs=1e-4)
    sparsities = [a.sparsity for a in alloc.layers]
    assert sparsities == pytest.approx(list(owl_sparsities(ratios, 0.5, 0.08)), abs=1e-12)
    assert sum(sparsities) / 4 == pytest.approx(0.5, abs=1e-12) and max(sparsities) - min(sparsities) == pytest.approx(0.16)
    got = folder_tensors(tmp_path / "out")
    for layer, s in enumerate(sparsities):
        zeros = total = 0
        step = 0.0  # the largest rounding of one count: 1/2 of a row (Wanda) or of a matrix (SparseGPT)
        for rel in LINEARS:
            W = got[f"model.layers.{layer}.{rel}.weight"]
            want = n_pruned(s, W.numel()) if method == "sparsegpt" else W.shape[0] * n_pruned(s, W.shape[1])
            assert int((W == 0).sum()) == want, (layer, rel)  # the exact count at S_l (matrix / row scope)
            zeros, total = zeros + want, total + W.numel()
            step = max(step, 0.5 / (W.numel() if method == "sparsegpt" else W.shape[1]))
        assert zeros / total == pytest.approx(s, abs=step)  # the layer's sparsity is S_l up to that rounding
    prov = json.loads((tmp_path / "out" / "rac_provenance.json").read_text())
    assert prov["allocation"] == alloc.to_json() and prov["stages"]["compress"]["prune"]["allocation"]["kind"] == "owl"
    assert prov["allocation"]["mean_sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert not list((tmp_path / "work" / "engine").glob("owl-acts-*"))  # the pre-pass stores are gone


def test_calibration_changes_the_allocation_and_uniform_has_none(tmp_path: Path, four_layers: Path) -> None:
    calib = write_calib(tmp_path / "c.parquet", random_sequences(6, 500, [12, 16, 20], seed=4))
    rac_run = compress(four_layers, calib, tmp_path / "a", _cfg(), tmp_path / "wa")
    prompt_run = compress(four_layers, calib, tmp_path / "b", _cfg(weights=PROMPT_ONLY), tmp_path / "wb")
    assert rac_run.allocation is not None and prompt_run.allocation is not None
    assert [a.ratio for a in rac_run.allocation.layers] != [a.ratio for a in prompt_run.allocation.layers]
    uniform = compress(four_layers, calib, tmp_path / "u", _cfg(allocation="uniform"), tmp_path / "wu")
    assert uniform.allocation is None
    assert "allocation" not in json.loads((tmp_path / "u" / "rac_provenance.json").read_text())


def test_resume_reads_the_allocation_back_and_is_bit_identical(tmp_path: Path, four_layers: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calib = write_calib(tmp_path / "c.parquet", random_sequences(5, 500, [10, 14], seed=5))
    cfg = _cfg()
    full = compress(four_layers, calib, tmp_path / "full", cfg, tmp_path / "w1")
    first = compress(four_layers, calib, tmp_path / "part", cfg, tmp_path / "w2", stop_after=(1, 2))
    assert first.allocation is not None and full.allocation is not None and not first.complete
    assert first.allocation.layers == full.allocation.layers  # the same measurement (times aside)

    def boom(run: object) -> None:
        raise AssertionError("a resumed run must not measure the allocation again")

    monkeypatch.setattr(allocation_mod, "measure_owl", boom)
    second = compress(four_layers, calib, tmp_path / "part", cfg, tmp_path / "w2", start_at=first.next_step)
    assert second.complete and second.allocation == first.allocation  # read back, not measured again
    a, b = folder_tensors(tmp_path / "full"), folder_tensors(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    third = compress(four_layers, calib, tmp_path / "p3", cfg, tmp_path / "w3", stop_after=(0, 0))
    (tmp_path / "w3" / "engine" / "allocation.json").unlink()
    with pytest.raises(ValueError, match="cannot resume: the OWL allocation of the checkpointed run is missing"):
        compress(four_layers, calib, tmp_path / "p3", cfg, tmp_path / "w3", start_at=third.next_step)


def test_owl_refused_for_moe_before_anything_is_written(tmp_path: Path) -> None:
    calib = write_calib(tmp_path / "c.parquet", random_sequences(3, 200, [8], seed=0))
    with pytest.raises(ValueError, match="'owl' is not supported for mixture-of-experts models yet"):
        compress(tiny_model("qwen3_moe"), calib, tmp_path / "out", _cfg(), tmp_path / "work")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_owl_labels_and_compare_setting_tell_uniform_from_owl() -> None:
    """qwen-owl.yaml parses into distinct labels (uniform and OWL at one sparsity are separate models), and
    `rac compare` sets them in separate rows ('50%' vs '50% owl')."""
    import yaml

    from rac.reporting.compare import _setting
    from rac.runs.run_config import parse_run_config, prune_label

    cfg_path = Path(__file__).resolve().parents[1] / "data/configs/results/qwen-owl.yaml"
    run = parse_run_config(yaml.safe_load(cfg_path.read_text()), str(cfg_path))
    labels = [j.label for j in run.jobs]
    assert len(set(labels)) == len(labels)
    assert "rac-sparsegpt-50pct-owl" in labels and "rac-sparsegpt-50pct" in labels
    owl_cfg = PruneConfig(method="sparsegpt", sparsity=0.6, allocation={"kind": "owl", "M": 7, "lam": 0.1})
    assert prune_label("prompt", owl_cfg) == "prompt-sparsegpt-60pct-owl-m7-l0.1"
    owl_row = {"calibration": "rac", "sparsity": 0.5, "prune_cfg": PruneConfig(
        method="sparsegpt", sparsity=0.5, allocation="owl").canonical()}
    uni_row = {"calibration": "rac", "sparsity": 0.5, "prune_cfg": PruneConfig(
        method="sparsegpt", sparsity=0.5).canonical()}
    assert (_setting(owl_row), _setting(uni_row)) == ("50% owl", "50%")
