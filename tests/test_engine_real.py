"""End to end on real checkpoints: SmolLM2-135M-Instruct (real weights) and a tiny random Qwen3.

Calibration and held-out text are the dense model's own samples (prompt tokens labelled "prompt", sampled
tokens "decode"). Checks: exact 50% sparsity (per row, or per matrix for SparseGPT's default mask) of every decoder linear, the pruned folder reloads with
transformers and generates, and held-out perplexity orders SparseGPT < Wanda < magnitude. SparseGPT runs in
the default group-sequential order; Wanda and magnitude, whose masks do not use the statistics of later
groups anyway, in the cheaper layer order (Wanda's own procedure).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from engine_support import Seq, write_calib
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rac.engine import CompressConfig, compress
from rac.models.assets import smollm2_135m, tiny_model
from rac.pruners import PruneConfig

QUESTIONS = [
    "What is 12 times 7?", "Explain why the sky is blue.", "Write a short poem about rain.",
    "How do I bake bread?", "Name three planets.", "What is a prime number?", "Describe a cat.",
    "How does a bicycle work?", "Give me a tip for studying.", "What is 45 plus 17?",
    "Why do leaves change color?", "Tell me about the ocean.",
]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Fewer torch threads: on a shared 2-core box small-batch decoding is faster single-threaded."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _dense_samples(model_dir: Path, samples: int, new_tokens: int) -> list[Seq]:
    """Prompt + sampled continuation of the dense model for every question (segments 0 / 1), one batch."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # [Q, width] left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, top_k=0,
                         temperature=1.0, num_return_sequences=samples, pad_token_id=pad)
    out: list[Seq] = []
    for i, row in enumerate(gen[:, width:].tolist()):
        prompt = prompts[i // samples]
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        out.append((prompt + row, [0] * len(prompt) + [1] * len(row)))
    return out


def _held_out(model_dir: Path, seqs: list[Seq], dense: list[torch.Tensor] | None) -> tuple[float, float, list[torch.Tensor]]:
    """(perplexity, mean KL(dense || model)) over the decode tokens of `seqs`, and the log-probs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, kl, n, logps = 0.0, 0.0, 0, []
    with torch.no_grad():
        for i, (ids, seg) in enumerate(seqs):
            keep = torch.tensor(seg[1:]) == 1
            logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)[keep]  # [D, vocab]
            nll -= float(logp.gather(1, torch.tensor(ids[1:])[keep][:, None]).sum())
            if dense is not None:
                kl += float((dense[i].exp() * (dense[i] - logp)).sum())
            n += int(keep.sum())
            logps.append(logp)
    return math.exp(nll / n), kl / n, logps


def _check_sparsity(out_dir: Path, n_layers: int, per_row: bool) -> None:
    """Exactly 50% zeros in every decoder linear: per row (Wanda, magnitude), or per matrix (SparseGPT's
    default mask, chosen per block over all rows)."""
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    linears = [k for k in index["weight_map"] if k.endswith("_proj.weight")]
    assert len(linears) == 7 * n_layers
    for name in linears:
        with safe_open(str(out_dir / index["weight_map"][name]), framework="pt") as f:
            w = f.get_tensor(name)
        if per_row:
            assert torch.all((w == 0).sum(1) == w.shape[1] // 2), name
        else:
            assert int((w == 0).sum()) == w.numel() // 2, name


def _check_greedy(model: torch.nn.Module, ids: torch.Tensor, gen: torch.Tensor, max_new: int) -> None:
    """`gen` is the greedy continuation of `ids`: checked against one teacher-forced forward of the whole
    sequence (no KV cache): every new token is that forward's argmax, and decoding runs to `max_new` tokens
    unless it stops on an EOS id."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    assert torch.equal(gen[0, : ids.shape[1]], ids[0])
    new = gen[0, ids.shape[1]:]
    assert len(new) == max_new or (0 < len(new) < max_new and int(new[-1]) in eos), new
    assert not set(new[:-1].tolist()) & eos
    with torch.no_grad():
        logits = model(input_ids=gen, use_cache=False).logits[0, ids.shape[1] - 1 : -1]  # [new, vocab]
    picked = logits.gather(1, new[:, None])[:, 0]
    assert torch.allclose(picked, logits.max(-1).values, atol=1e-4), (picked, logits.max(-1))


def _run(model_dir: Path, tmp_path: Path, samples: int, new_tokens: int, n_calib: int) -> tuple[dict[str, float], dict[str, float]]:
    with _threads(1):
        seqs = _dense_samples(model_dir, samples, new_tokens)
        calib, held = seqs[:n_calib], seqs[n_calib:]
        path = write_calib(tmp_path / "calib.parquet", calib)
        ppl: dict[str, float] = {}
        kl: dict[str, float] = {}
        ppl["dense"], _, dense = _held_out(model_dir, held, None)
        n_layers = AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers
        for method, order in (("sparsegpt", "group"), ("wanda", "layer"), ("magnitude", "layer")):
            cfg = CompressConfig(prune=PruneConfig(method=method, sparsity=0.5), sequential=order,
                                 act_dtype="float32", compute_dtype="float32")  # bf16 is emulated on AVX2 CPUs
            out = compress(model_dir, path, tmp_path / method, cfg, tmp_path / f"work-{method}").out_dir
            assert out is not None
            _check_sparsity(out, n_layers, per_row=cfg.prune.scope == "row")
            ppl[method], kl[method], _ = _held_out(out, held, dense)
    tok = AutoTokenizer.from_pretrained(tmp_path / "sparsegpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sparsegpt", dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    _check_greedy(model, ids, gen, 8)
    print("held-out perplexity:", {k: round(v, 3) for k, v in ppl.items()}, "KL:", kl)
    return ppl, kl


def _vllm_matches_transformers(out_dir: Path) -> None:
    """vLLM loads the pruned folder and decodes greedily the same tokens as transformers (float32)."""
    from rac.data.engines import Request, SamplingSpec, VLLMEngine

    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[9]}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    expect = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    engine = VLLMEngine(out_dir, [tok.eos_token_id], dtype="float32", batch_size=1, max_model_len=512, threads=1)
    try:
        got = engine.generate([Request(ids, seed=0, max_new_tokens=12)], SamplingSpec(0.0, 1.0, 0, 1.0, 12))
    finally:
        engine.close()
    assert got[0].token_ids == expect[: len(got[0].token_ids)] and len(got[0].token_ids) >= 8


@pytest.mark.slow
def test_smollm2_real_model(tmp_path: Path) -> None:
    ppl, kl = _run(smollm2_135m(), tmp_path, samples=3, new_tokens=64, n_calib=28)
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["wanda"] < ppl["magnitude"], ppl
    assert kl["sparsegpt"] < kl["wanda"] < kl["magnitude"], kl
    _vllm_matches_transformers(tmp_path / "sparsegpt")


def test_tiny_random_qwen3(tmp_path: Path) -> None:
    """A random model's next-token distribution is near uniform (perplexity ~ vocab size for every method),
    so the ordering is checked on KL(dense || pruned) over the held-out decode tokens instead."""
    _, kl = _run(tiny_model("qwen3"), tmp_path, samples=4, new_tokens=24, n_calib=32)
    assert kl["sparsegpt"] < kl["wanda"] < kl["magnitude"], kl
