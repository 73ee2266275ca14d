"""Model adapters: the architecture table, linear selection by globs, and layer-call capture."""

from __future__ import annotations

import fnmatch
import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from rac.engine import CompressConfig, compress
from rac.models.adapters import (
    ADAPTERS,
    UnsupportedArchitectureError,
    capture_layer_call,
    get_adapter,
    select_groups,
)
from rac.models.assets import tiny_model
from rac.pruners import PruneConfig


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        get_adapter("gpt2")
    model_dir = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(model_dir)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        compress(model_dir, tmp_path / "calib.parquet", tmp_path / "out",
                 CompressConfig(prune=PruneConfig(sparsity=0.5)), tmp_path / "work")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_table_rows_match_real_modules() -> None:
    """Every adapter row names modules that exist in a real model of that family (tiny instances)."""
    for arch in ("llama", "qwen2", "qwen3"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model(arch))
        adapter = ADAPTERS[model.config.model_type]
        names = dict(model.named_modules())
        for path in (adapter.embed, adapter.layers, adapter.norm, adapter.rotary, adapter.lm_head):
            assert path in names, (arch, path)
        linears = {n.split(".", 3)[-1] for n, m in names.items()
                   if isinstance(m, torch.nn.Linear) and n.startswith(adapter.layers + ".0.")}
        assert sorted(adapter.linear_names()) == sorted(linears)


@pytest.mark.parametrize("include,exclude", [
    (("*",), ("lm_head", "*embed_tokens*")),
    (("*mlp*",), ()),
    (("model.layers.1.*", "*.q_proj"), ("*.down_proj",)),
    (("*",), ("*.k_proj", "model.layers.0.self_attn.*")),
])
def test_selection_equals_brute_force(include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    adapter = get_adapter("llama")
    table = select_groups(adapter, 3, include, exclude)
    for layer, g in itertools.product(range(3), range(len(adapter.groups))):
        expect = tuple(r for r in adapter.groups[g]
                       if any(fnmatch.fnmatchcase(f"model.layers.{layer}.{r}", p) for p in include)
                       and not any(fnmatch.fnmatchcase(f"model.layers.{layer}.{r}", p) for p in exclude))
        assert table[layer][g] == expect


def test_include_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="'lm_head'"):
        select_groups(get_adapter("qwen3"), 2, ("lm_head", "*.q_proj"), ())
    with pytest.raises(ValueError, match="n_layers"):
        select_groups(get_adapter("qwen3"), 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding"])
def test_captured_calls_replay_the_model(arch: str) -> None:
    """Layer i called on the captured (hidden, kwargs) reproduces the model's own hidden states, layer by layer."""
    path = (tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1)
            if arch == "qwen2-sliding" else tiny_model(arch))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = get_adapter(model.config.model_type)
    ids = torch.randint(0, model.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states  # [n_layers+1] x [B, L, h]
    hidden, kwargs0 = capture_layer_call(model, adapter, 0, input_ids=ids, use_cache=False)
    assert torch.equal(hidden, model.model.embed_tokens(ids))
    assert "position_embeddings" in kwargs0 and "attention_mask" in kwargs0
    masks = []
    for i, layer in enumerate(model.model.layers):
        _, kw = capture_layer_call(model, adapter, i, inputs_embeds=torch.zeros(2, 15, model.config.hidden_size),
                                   use_cache=False)
        masks.append(kw["attention_mask"])
        with torch.no_grad():
            out = layer(hidden, **kw)
        hidden = out[0] if isinstance(out, tuple) else out
        if i + 1 < len(model.model.layers):  # the last entry of `ref` is after the final norm
            torch.testing.assert_close(hidden, ref[i + 1], rtol=1e-5, atol=1e-5)
    if arch == "qwen2-sliding":  # layer 1 attends within a window of 6: its mask must differ from layer 0's
        assert masks[1] is not None and (masks[0] is None or not torch.equal(masks[0], masks[1]))


def test_trust_remote_code_is_off_by_default(tmp_path: Path) -> None:
    assert CompressConfig(prune=PruneConfig(sparsity=0.5)).trust_remote_code is False
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(
        {"model_type": "my_custom_lm", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        compress(model_dir, tmp_path / "c.parquet", tmp_path / "out",
                 CompressConfig(prune=PruneConfig(sparsity=0.5)), tmp_path / "w")
