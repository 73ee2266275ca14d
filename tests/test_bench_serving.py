"""bench.serving's transformers greedy loop masks the end tokens exactly as vLLM's `min_tokens` does, so a
divergence between the two engines is never "transformers stopped"."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bench.serving import end_token_ids, hf_greedy
from rac.models.assets import tiny_model
from rac.models.loading import load_causal_lm


def _folder_with_ends(tmp_path: Path, ends: list[int]) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": ends}))
    return folder


def test_end_token_ids_unions_config_and_generation_config(tmp_path: Path) -> None:
    folder = _folder_with_ends(tmp_path, [5, 7])
    model_eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    assert end_token_ids(folder) == {5, 7, model_eos}
    (folder / "generation_config.json").unlink()
    assert end_token_ids(folder) == {model_eos}


def test_hf_greedy_never_emits_a_masked_token_and_equals_a_masked_reference(tmp_path: Path) -> None:
    plain = tiny_model("llama")
    prompt = [[1, 17, 42, 99, 3]]
    # the ids the unmasked model picks first: masking them must change the greedy path
    model = load_causal_lm(plain, torch.bfloat16)
    with torch.inference_mode():
        first = int(model(input_ids=torch.tensor(prompt)).logits[0, -1].argmax())
    folder = _folder_with_ends(tmp_path, [first])
    out = hf_greedy(folder, prompt, new_tokens=12, threads=1)
    masked = end_token_ids(folder)
    assert first in masked and not set(out["tokens"][0]) & masked
    # reference: the same cached bf16 steps (so no bf16 tie can part them), the mask applied with torch.where
    ids, ref = torch.tensor(prompt), []
    end = torch.tensor(sorted(masked))
    with torch.inference_mode():
        step = model(input_ids=ids, use_cache=True)
        for _ in range(12):
            logits = step.logits[0, -1]
            logits = torch.where(torch.isin(torch.arange(logits.numel()), end), float("-inf"), logits)
            ref.append(int(logits.argmax()))
            step = model(input_ids=torch.tensor([[ref[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    assert out["tokens"][0] == ref
    assert out["masked"] == sorted(masked)
