"""Model builds in two threads at once leave transformers' class patches as they were (rac.models.loading).

transformers' `from_pretrained` swaps `PreTrainedModel.tie_weights` / `init_weights` for no-ops while it builds
and puts back what it found. The test makes the second build start while the first one is inside that window
(the first waits in `post_init`, which runs under the patch, until the second build reaches it too or 2 s pass).
Unserialised, the second build finds the no-ops, the first puts the originals back, then the second puts the
no-ops back: every later model loads with its tied LM head untied and uninitialised. With `BUILD_LOCK` the
second build waits for the first and the originals stay.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from rac.models.loading import load_causal_lm
from rac.models.streaming import build_skeleton


def _tied_folder(path: Path) -> Path:
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _tied(model: torch.nn.Module) -> bool:
    return bool(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())  # type: ignore[union-attr, operator]


def test_overlapping_builds_keep_transformers_unpatched(tmp_path: Path) -> None:
    folder = _tied_folder(tmp_path / "tied")
    original = (PreTrainedModel.tie_weights, PreTrainedModel.init_weights, torch.nn.Module.register_parameter)
    real_post_init = PreTrainedModel.post_init
    first_inside, second_inside = threading.Event(), threading.Event()
    overlapped: list[bool] = []
    models: dict[str, torch.nn.Module] = {}

    def post_init(self: PreTrainedModel) -> None:
        if threading.current_thread().name == "first" and not first_inside.is_set():
            first_inside.set()
            overlapped.append(second_inside.wait(timeout=2))  # the second build gets here only if unserialised
        elif threading.current_thread().name == "second":
            second_inside.set()
        real_post_init(self)

    def build(name: str) -> None:
        models[name] = load_causal_lm(folder, torch.float32) if name == "first" else build_skeleton(
            LlamaConfig.from_pretrained(folder))

    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]
    try:
        first = threading.Thread(target=build, args=("first",), name="first")
        first.start()
        assert first_inside.wait(timeout=60)
        second = threading.Thread(target=build, args=("second",), name="second")
        second.start()
        first.join(timeout=120)
        second.join(timeout=120)
        after = (PreTrainedModel.tie_weights, PreTrainedModel.init_weights, torch.nn.Module.register_parameter)
    finally:
        PreTrainedModel.post_init = real_post_init  # type: ignore[method-assign]
        PreTrainedModel.tie_weights, PreTrainedModel.init_weights, torch.nn.Module.register_parameter = original  # type: ignore[method-assign]
    assert overlapped == [False], "the second build ran while the first was inside transformers' patch"
    assert after == original
    assert sorted(models) == ["first", "second"] and _tied(models["first"])
    assert next(models["second"].parameters()).is_meta
    again = load_causal_lm(folder, torch.float32)
    assert _tied(again) and bool(torch.isfinite(again(torch.tensor([[1, 2, 3]])).logits).all())
