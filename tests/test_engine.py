"""The streamed sequential engine against an in-memory reference; resume; exact sparsity; outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_support import folder_tensors, random_sequences, reference_prune, write_calib
from transformers import AutoModelForCausalLM

from rac.engine import CompressConfig, StepRecord, compress
from rac.engine.checkpoint import sha256_file
from rac.models.assets import tiny_model
from rac.pruners import PruneConfig

WEIGHTS = {"prompt": 0.5, "decode": 1.0, "other": 1.0}


def _cfg(method: str = "sparsegpt", sequential: str = "group", **kw: object) -> CompressConfig:
    base: dict[str, object] = dict(prune=PruneConfig(method=method, sparsity=0.5), sequential=sequential,
                                   act_dtype="float32", compute_dtype="float32", batch_tokens=48,
                                   segment_weights=WEIGHTS)
    base.update(kw)
    return CompressConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sliding_qwen2() -> Path:
    """Tiny Qwen2 whose layer 1 uses sliding-window attention (window 6 < sequence lengths)."""
    return tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1)


EQUAL = {"prompt": 1.0, "decode": 1.0, "other": 1.0}  # one merged accumulator slot in the engine
PROMPT_ONLY = {"prompt": 1.0, "decode": 0.0}  # decode tokens masked out


@pytest.mark.parametrize("arch,sequential,weights", [
    ("qwen3", "group", WEIGHTS), ("qwen3", "layer", WEIGHTS), ("llama", "group", WEIGHTS),
    ("llama", "layer", EQUAL), ("qwen2-sliding", "group", EQUAL), ("qwen2-sliding", "layer", WEIGHTS),
    ("qwen3", "group", PROMPT_ONLY),
])
def test_streamed_equals_in_memory_reference(tmp_path: Path, arch: str, sequential: str,
                                             weights: dict[str, float], sliding_qwen2: Path) -> None:
    model_dir = sliding_qwen2 if arch == "qwen2-sliding" else tiny_model(arch)
    seqs = random_sequences(7, 500, [12, 16, 16, 20], seed=1)
    calib = write_calib(tmp_path / "calib.parquet", seqs)
    cfg = _cfg(sequential=sequential, segment_weights=weights)
    records: list[StepRecord] = []
    compress(model_dir, calib, tmp_path / "out", cfg, tmp_path / "work", on_step=records.append)
    got = folder_tensors(tmp_path / "out")
    ref, rel_errors = reference_prune(model_dir, seqs, cfg.prune, sequential, weights)
    assert set(ref) == {k for k in got if k.endswith("_proj.weight")}
    for name, w in ref.items():
        assert torch.equal(got[name] == 0, w == 0), name  # same masks
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5, msg=name)
    reported = {lin.name + ".weight": lin.rel_error for r in records for lin in r.linears}
    assert reported.keys() == rel_errors.keys()
    for name, err in rel_errors.items():  # provenance error == rac.pruners.error.relative_error on the reference H
        assert reported[name] == pytest.approx(err, rel=1e-3), name
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[name], dense[name])


def test_modes_differ_and_segment_weights_matter(tmp_path: Path) -> None:
    """Sanity of the comparison above: the two orders and two segment weightings give different weights."""
    model_dir = tiny_model("qwen3")
    seqs = random_sequences(6, 500, [16], seed=2)
    calib = write_calib(tmp_path / "c.parquet", seqs)
    outs = {}
    for tag, cfg in {"group": _cfg(), "layer": _cfg(sequential="layer"),
                     "prompt-only": _cfg(segment_weights={"prompt": 1.0, "decode": 0.0})}.items():
        compress(model_dir, calib, tmp_path / tag, cfg, tmp_path / f"w-{tag}")
        outs[tag] = folder_tensors(tmp_path / tag)["model.layers.1.mlp.down_proj.weight"]
    assert not torch.allclose(outs["group"], outs["layer"])
    assert not torch.allclose(outs["group"], outs["prompt-only"])


@pytest.mark.parametrize("stop", [(0, 3), (1, 1), (0, 0)])
def test_stop_and_resume_equals_uninterrupted(tmp_path: Path, stop: tuple[int, int]) -> None:
    model_dir = tiny_model("qwen3")
    calib = write_calib(tmp_path / "c.parquet", random_sequences(6, 500, [10, 14], seed=3))
    cfg = _cfg()
    compress(model_dir, calib, tmp_path / "full", cfg, tmp_path / "w1")
    seen: list[StepRecord] = []
    first = compress(model_dir, calib, tmp_path / "part", cfg, tmp_path / "w2", stop_after=stop,
                     on_step=seen.append)
    assert not first.complete and first.out_dir is None and not (tmp_path / "part").exists()
    assert [(s.layer, s.group) for s in seen][-1] == stop
    nxt = first.next_step
    assert nxt == ((stop[0], stop[1] + 1) if stop[1] < 3 else (stop[0] + 1, 0))
    second = compress(model_dir, calib, tmp_path / "part", cfg, tmp_path / "w2", start_at=nxt,
                      on_step=seen.append)
    assert second.complete
    steps = [(s.layer, s.group) for s in seen]
    assert steps == [(layer, g) for layer in range(2) for g in range(4)]  # every step once, in order
    full, part = folder_tensors(tmp_path / "full"), folder_tensors(tmp_path / "part")
    assert full.keys() == part.keys()
    for name in full:
        assert torch.equal(full[name], part[name]), name


def test_step_records_and_checkpoint_hashes(tmp_path: Path) -> None:
    model_dir = tiny_model("llama")
    calib = write_calib(tmp_path / "c.parquet", random_sequences(5, 500, [12], seed=4))
    seen: list[StepRecord] = []

    def on_step(rec: StepRecord) -> None:  # files must exist and match their hash when reported
        for f in rec.files:
            assert f.path.is_file() and sha256_file(f.path) == f.sha256 and f.path.stat().st_size == f.bytes
        seen.append(rec)

    cfg = _cfg(exclude=("*.k_proj", "model.layers.1.mlp.*"))
    compress(model_dir, calib, tmp_path / "out", cfg, tmp_path / "w", on_step=on_step)
    names = {(s.layer, s.group): [lin.name.split(".", 3)[-1] for lin in s.linears] for s in seen}
    assert names[(0, 0)] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert names[(1, 2)] == [] and names[(1, 3)] == []
    assert [f.path.name for f in seen[3].files] == ["step-00000-3.safetensors", "acts-00001.bin", "acts-00001.bin.json"]
    out = folder_tensors(tmp_path / "out")
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    for rec in seen:
        for lin in rec.linears:
            w = out[lin.name + ".weight"]
            # SparseGPT's default mask: per block over all rows, so the count is exact per matrix
            assert int((w == 0).sum()) == round(0.5 * w.numel()), lin.name
            assert lin.sparsity == 0.5 and 0 < lin.rel_error < 1 and lin.tokens == 60 and lin.retries == 0
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], dense["model.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], dense["model.layers.1.mlp.up_proj.weight"])
    prov = json.loads((tmp_path / "out" / "rac_provenance.json").read_text())
    assert prov["calibration"]["sha256"] == sha256_file(calib)
    assert prov["calibration"]["segment_tokens"] == {"prompt": 20, "decode": 40, "other": 0}
    assert prov["stages"]["compress"] == cfg.canonical()
    assert prov["pruned_linears"] == 9 and prov["achieved_sparsity"] == 0.5
    assert [x["layer"] for x in prov["layer_seconds"]] == [0, 1]
    assert {x["name"] for x in prov["linears"]} == {lin.name for s in seen for lin in s.linears}


def test_nm_sparsity_and_resume_guard(tmp_path: Path) -> None:
    model_dir = tiny_model("qwen3")
    calib = write_calib(tmp_path / "c.parquet", random_sequences(4, 500, [16], seed=5))
    cfg = _cfg(method="wanda", prune=PruneConfig(method="wanda", nm=(2, 4)))
    compress(model_dir, calib, tmp_path / "out", cfg, tmp_path / "w", stop_after=(0, 2))
    with pytest.raises(ValueError, match="config"):
        compress(model_dir, calib, tmp_path / "out", _cfg(), tmp_path / "w", start_at=(0, 3))
    compress(model_dir, calib, tmp_path / "out", cfg, tmp_path / "w", start_at=(0, 3))
    for name, w in folder_tensors(tmp_path / "out").items():
        if name.endswith("_proj.weight"):
            kept = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            assert torch.all(kept == 2), name
    assert not (tmp_path / "w" / "engine" / "acts-00002.bin").exists()  # final boundary freed


def test_pruned_folder_generates(tmp_path: Path) -> None:
    model_dir = tiny_model("qwen3")
    before = {p.name: sha256_file(p) for p in model_dir.iterdir() if p.is_file()}
    calib = write_calib(tmp_path / "c.parquet", random_sequences(4, 500, [16], seed=6))
    compress(model_dir, calib, tmp_path / "out", CompressConfig(prune=PruneConfig(sparsity=0.5)), tmp_path / "w")
    assert {p.name: sha256_file(p) for p in model_dir.iterdir() if p.is_file()} == before  # source untouched
    copied = {p.name for p in (tmp_path / "out").iterdir()} - {"rac_provenance.json", "model.safetensors.index.json"}
    assert {n for n in before if not n.endswith(".safetensors") and not n.startswith("rac_")} <= copied
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
