"""Where vLLM's and transformers' greedy tokens part in `bench.serving`, were they near-ties?

`bench/results/serving.json` holds, per folder (dense bf16 and each W4A16 folder), vLLM's batch-8 greedy tokens
and transformers' batch-1 greedy tokens for the same 8 prompts. Where they first differ, at step t, both
engines agree on the prompt plus t tokens; the question is whether the two chosen tokens were (nearly) tied.
This re-runs transformers (`rac.models.loading.load_causal_lm`, bfloat16 as in serving, and float32 as an
independent, more exact reference) on prompt + the common prefix and reports, per diverging prompt:
  * margin_bf16: logit(transformers' token) - logit(vLLM's token) in the bf16 model (>= 0: its argmax);
  * the same margin in float32 and which of the two tokens float32 prefers;
  * the bf16 logit step at that magnitude (spacing of bf16 numbers near |logit|), for scale.
A margin of one or two bf16 steps means the engines' different kernels (batched paged attention vs. eager
matmuls) decided a tie, not that the folder is served differently. A step where transformers picks an end token
(`bench.serving.end_token_ids`) is not a serving difference either: `bench.serving` asks vLLM for exactly
64 tokens with `min_tokens`, which masks the end tokens; results written before its transformers loop masked
them too can hold such steps, listed as `eos` and left out of the summary. Writes bench/results/serving-ties.md|json.

    .venv/bin/python -m bench.serving_ties      # after `python -m bench.serving`; ~2 min here
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from bench.serving import QUESTIONS, end_token_ids
from rac.models.loading import load_causal_lm

RESULTS = Path(__file__).resolve().parent / "results"


def _first_diff(a: list[int], b: list[int]) -> int | None:
    """First step where the two greedy sequences differ (None: equal over their common length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def _bf16_step(x: float) -> float:
    """Spacing of bfloat16 numbers near |x| (8 significand bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


def margins(folder: Path, prompts: list[list[int]], vllm: list[list[int]], hf: list[list[int]],
            eos: set[int]) -> list[dict[str, Any]]:
    """One record per prompt whose tokens differ: step, both tokens, whether transformers' is an end token,
    bf16 / fp32 margins."""
    cases = [(i, t) for i, t in ((i, _first_diff(vllm[i], hf[i])) for i in range(len(prompts))) if t is not None]
    out: dict[int, dict[str, Any]] = {i: {"prompt": i, "step": t, "hf_token": hf[i][t], "vllm_token": vllm[i][t],
                                          "eos": hf[i][t] in eos} for i, t in cases}
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        model = load_causal_lm(folder, dtype)
        with torch.inference_mode():
            for i, t in cases:
                ids = torch.tensor([prompts[i] + hf[i][:t]])  # [1, L]: prompt + the common prefix
                logits = model(input_ids=ids).logits[0, -1].float()  # [vocab]
                rec = out[i]
                rec[f"margin_{tag}"] = round(float(logits[rec["hf_token"]] - logits[rec["vllm_token"]]), 4)
                rec[f"logit_{tag}"] = round(float(logits[rec["hf_token"]]), 3)
                if tag == "fp32":
                    rec["fp32_prefers"] = "transformers" if rec["margin_fp32"] > 0 else "vllm"
        del model
    for rec in out.values():
        rec["bf16_step"] = _bf16_step(rec["logit_bf16"])
    return list(out.values())


def _markdown(result: dict[str, Any]) -> str:
    body = ("| folder | prompt | step | transformers' token | margin bf16 | bf16 step at that logit | margin fp32 | "
            "fp32 prefers |\n|---|---|---|---|---|---|---|---|\n")
    for label, recs in result["folders"].items():
        for r in recs:
            kind = "end token (masked in vLLM by min_tokens)" if r["eos"] else str(r["hf_token"])
            body += (f"| {label} | {r['prompt']} | {r['step']} | {kind} | {r['margin_bf16']:+.4f} | {r['bf16_step']:.4f} | "
                     f"{r['margin_fp32']:+.4f} | {r['fp32_prefers']} |\n")
    return (f"# Where vLLM and transformers part (greedy, {result['source']})\n\nCommand: `{result['command']}`. "
            "Margin = logit of transformers' token minus logit of vLLM's token at the first differing step, "
            "computed by transformers on the prompt plus the common prefix (bf16 as served; fp32 as an exact "
            "reference).\n\n" + body + "\n" + result["summary"] + "\n")


def main() -> None:
    from transformers import AutoTokenizer

    src = json.loads((RESULTS / "serving.json").read_text())
    dense = Path(src["rows"][0]["folder"])
    eos = end_token_ids(dense)
    tok = AutoTokenizer.from_pretrained(dense)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    folders: dict[str, list[dict[str, Any]]] = {}
    for row in src["rows"]:
        hf = src["hf_vs_vllm"][row["label"]]["hf_tokens"]
        folders[row["label"]] = margins(Path(row["folder"]), prompts, row["tokens"], hf, eos)
    every = [r for v in folders.values() for r in v]
    recs = [r for r in every if not r["eos"]]
    worst = max((abs(r["margin_bf16"]) / r["bf16_step"] for r in recs), default=0.0)
    summary = (f"{len(every)} diverging prompts over {len(folders)} folders, {len(every) - len(recs)} of them at an "
               f"end token vLLM was told to mask. Of the other {len(recs)}, the largest bf16 margin is "
               f"{worst:.1f} bf16 steps; fp32 sides with transformers in "
               f"{sum(r['fp32_prefers'] == 'transformers' for r in recs)} and with vLLM in "
               f"{sum(r['fp32_prefers'] == 'vllm' for r in recs)}.")
    result = {"command": "python -m bench.serving_ties", "source": "bench/results/serving.json",
              "folders": folders, "summary": summary}
    (RESULTS / "serving-ties.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "serving-ties.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
    sys.exit(0)
