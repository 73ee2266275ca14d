"""Quantizing through the streamed engine: GPTQ and joint sparse + quantized runs write compressed-tensors folders
that transformers loads with exactly rac's Ŵ; the engine equals the in-memory reference; resume is bit-identical;
the folder is smaller by the expected ratio; joint 2:4 + 4-bit keeps the exact N:M pattern."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_support import folder_tensors, random_sequences, reference_prune, write_calib
from transformers import AutoModelForCausalLM

from rac.engine import CompressConfig, compress
from rac.engine.quantized_folder import size_ratio
from rac.models.assets import tiny_model
from rac.models.streaming import WeightFiles
from rac.pruners import PruneConfig

EQUAL = {"prompt": 1.0, "decode": 1.0, "other": 1.0}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _cfg(prune: dict[str, object]) -> CompressConfig:
    return CompressConfig(prune=PruneConfig(**prune), sequential="group", act_dtype="float32",  # type: ignore[arg-type]
                          compute_dtype="float32", batch_tokens=48, segment_weights=EQUAL)


def _loaded_linears(out_dir: Path) -> dict[str, torch.Tensor]:
    """Decoder linear weights as transformers serves them from the folder (decompressed), float32."""
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses the linears on the first forward
    out = {}
    for name, mod in model.named_modules():
        if name.endswith(PROJ):
            w = getattr(mod, "weight", None)
            if w is None or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # still compressed
                raise AssertionError(f"{name}: transformers left the weight compressed ({type(mod).__name__})")
            out[name + ".weight"] = w.detach().float()
    return out


@pytest.mark.parametrize("prune", [
    {"method": "gptq", "bits": 4, "group_size": 32},  # the "full" grid (default): codes -8..7
    {"method": "gptq", "bits": 4, "group_size": 32, "grid": "qmax"},  # codes -7..7
    {"method": "gptq", "bits": 4, "group_size": 32, "scales": "static"},  # llm-compressor's setting
    {"method": "gptq", "bits": 4, "group_size": None, "act_order": False},
    {"method": "sparsegpt", "nm": (2, 4), "quant": {"bits": 4, "group_size": 32}},
    {"method": "sparsegpt", "sparsity": 0.5, "quant": {"bits": 4, "group_size": 64}},
])
def test_quantized_folder_loads_with_rac_weights(tmp_path: Path, prune: dict[str, object]) -> None:
    # one layer: its groups see the engine's own pruned upstream groups, but no earlier layer's rounding flips,
    # which make later layers' masks diverge chaotically from the reference (near-ties on a random model)
    model_dir = tiny_model("llama", num_hidden_layers=1)
    seqs = random_sequences(6, 500, [12, 16], seed=5)
    calib = write_calib(tmp_path / "c.parquet", seqs)
    cfg = _cfg(prune)
    compress(model_dir, calib, tmp_path / "out", cfg, tmp_path / "work")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"]
    raw = folder_tensors(tmp_path / "out")
    assert not [k for k in raw if k.endswith("_proj.weight")]  # every decoder linear is packed
    ref, _ = reference_prune(model_dir, seqs, cfg.prune, "group", EQUAL)  # in-memory engine, same solver
    served = _loaded_linears(tmp_path / "out")
    assert served.keys() == ref.keys()
    spec = cfg.prune.quant
    assert spec is not None
    lowest = []
    for name, w in ref.items():
        got = served[name]
        # the streamed engine = the reference, but for a rare code flipped one step by a near-tie in H
        off = ~torch.isclose(got, w, rtol=1e-4, atol=1e-5)
        assert int(off.sum()) <= max(2, w.numel() // 500), f"{name}: {int(off.sum())} of {w.numel()} differ"
        module = name.removesuffix(".weight")
        scale = raw[module + ".weight_scale"].float()  # [out, G] bf16 in the folder
        width = w.shape[1] // scale.shape[1]
        codes = got / scale.repeat_interleave(width, dim=1)  # served Ŵ / served scale: integers on the grid
        assert torch.equal(codes, codes.round()), name
        assert int(codes.max()) <= spec.q_max and int(codes.min()) >= -spec.q_max - 1, name
        lowest.append(int(codes.min()))
        if cfg.prune.nm is not None:
            kept = (got != 0).reshape(w.shape[0], -1, 4).sum(-1)  # [out, in / 4]
            assert int(kept.max()) <= 2, name  # exact 2:4 (a kept weight may round to 0)
        elif cfg.prune.target_sparsity > 0:
            assert float((got == 0).float().mean()) >= cfg.prune.target_sparsity - 1e-6, name
    # the full grid's lowest code survives packing (GPTQ's updates can reach it on the qmax grid too)
    assert min(lowest) == -spec.q_max - 1 or spec.grid == "qmax"
    prov = json.loads((tmp_path / "out" / "rac_provenance.json").read_text())
    assert prov["quantization"]["scheme"] == spec.label and prov["quantization"]["grid"] == spec.grid


def test_quantized_folder_size_and_resume(tmp_path: Path) -> None:
    model_dir = tiny_model("llama", hidden_size=128, intermediate_size=256)
    calib = write_calib(tmp_path / "c.parquet", random_sequences(6, 500, [12, 16], seed=7))
    cfg = _cfg({"method": "gptq", "bits": 4, "group_size": 128})
    compress(model_dir, calib, tmp_path / "full", cfg, tmp_path / "w1")
    first = compress(model_dir, calib, tmp_path / "part", cfg, tmp_path / "w2", stop_after=(0, 2))
    assert not first.complete and first.next_step == (0, 3)
    compress(model_dir, calib, tmp_path / "part", cfg, tmp_path / "w2", start_at=first.next_step)
    full, part = folder_tensors(tmp_path / "full"), folder_tensors(tmp_path / "part")
    assert full.keys() == part.keys()
    for name in full:
        assert torch.equal(full[name], part[name]), name
    dense = WeightFiles(model_dir)
    linears = [k.removesuffix(".weight") for k in dense.specs if k.endswith("_proj.weight")]
    expected = size_ratio(dense.specs, linears, cfg.prune.quant, torch.bfloat16)  # type: ignore[arg-type]
    got = sum(t.numel() * t.element_size() for t in full.values())
    want = sum(t.numel() * t.element_size() for t in _tensors_of(model_dir).values())
    assert got / want == pytest.approx(expected, rel=1e-9)
    assert got / want < 0.75  # fp32 dense embeddings dominate a tiny model; the linears shrink ~8x


def _tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    files = WeightFiles(model_dir)
    return files.load(list(files.specs))
