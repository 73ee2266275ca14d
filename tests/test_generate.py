"""CoT generation: sampling math, per-row determinism, sharded resume, budgets, and both engines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rac.data import generate as gen_mod
from rac.data.engines import (
    Request,
    SamplingSpec,
    TransformersEngine,
    UnknownEngineError,
    filter_logits,
    make_engine,
)
from rac.data.generate import GenerateConfig, build_requests, generate_cots, read_cots, special_ids
from rac.data.prompts import PromptsConfig, PromptTooLongError, sample_prompts
from rac.data.templates import load_tokenizer
from rac.models.assets import smollm2_135m, tiny_model

SPEC = SamplingSpec(temperature=0.7, top_p=0.8, top_k=0, repetition_penalty=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("p") / "prompts.parquet"
    sample_prompts(PromptsConfig(source="gsm8k", n=5, seed=1), tiny, out)
    return out


def test_filter_logits_matches_a_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    hist = np.array([3, 7, 7, 11])
    spec = SamplingSpec(temperature=0.5, top_p=0.7, top_k=20, repetition_penalty=1.3, max_new_tokens=1)
    ref = logits.copy()
    for t in set(hist.tolist()):
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    ref /= 0.5
    ref[ref < np.sort(ref)[-20]] = -np.inf
    order = np.argsort(-ref, kind="stable")
    p = np.exp(ref[order] - ref[order][0])
    p /= p.sum()
    keep = order[: int(np.searchsorted(np.cumsum(p), 0.7) + 1)]
    out = filter_logits(torch.tensor(logits), spec, torch.tensor(hist)).numpy()
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == set(keep.tolist())
    np.testing.assert_allclose(out[keep], ref[keep], rtol=1e-6)


def test_a_rows_tokens_do_not_depend_on_its_batch(tiny: Path) -> None:
    eos, pad = special_ids(tiny)
    eng = TransformersEngine(tiny, eos, pad, dtype="float32", batch_size=4)
    tok = load_tokenizer(str(tiny))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Tom has 3 apples", "Ana has", "Li gets 7 more")]
    reqs = [Request(x, seed=100 + i, max_new_tokens=12) for i, x in enumerate(ids)]
    together = eng.generate(reqs, SPEC)
    alone = [eng.generate([r], SPEC)[0] for r in reqs]
    assert together == alone
    other_seed = eng.generate([Request(ids[0], seed=999, max_new_tokens=12)], SPEC)[0]
    assert other_seed.token_ids != together[0].token_ids


def test_shards_store_exact_ids_that_decode_to_text(tiny: Path, prompts: Path, tmp_path: Path) -> None:
    cfg = GenerateConfig(max_new_tokens=16, shard_size=2, samples_per_prompt=2, dtype="float32")
    s = generate_cots(prompts, tiny, cfg, tmp_path / "cots")
    t = read_cots(tmp_path / "cots")
    assert s.n_rows == t.num_rows == 10 and s.n_shards == 3 and s.shards_written == 3
    assert sorted(p.name for p in (tmp_path / "cots").iterdir()) == [f"part-0000{k}.parquet" for k in range(3)]
    tok = load_tokenizer(str(tiny))
    eos, _ = special_ids(tiny)
    src = pq.read_table(prompts)
    by_id = dict(zip(src.column("prompt_id").to_pylist(), src.column("input_ids").to_pylist(), strict=True))
    for r in t.to_pylist():
        assert tok.decode(r["completion_ids"], skip_special_tokens=True) == r["text"]
        assert r["prompt_ids"] == by_id[r["prompt_id"]] and r["prompt_len"] == len(r["prompt_ids"])
        if r["finish_reason"] == "stop":
            assert r["completion_ids"][-1] in eos
        else:
            assert r["completion_len"] == 16 and not set(r["completion_ids"]) & set(eos)
    assert len(set(t.column("cot_id").to_pylist())) == 10


def test_interrupted_run_resumes_without_duplicates(tiny: Path, prompts: Path, tmp_path: Path) -> None:
    cfg = GenerateConfig(max_new_tokens=12, shard_size=2, dtype="float32", seed=7)
    full = generate_cots(prompts, tiny, cfg, tmp_path / "full")

    def boom(k: int, path: Path) -> None:
        if k == 1:
            raise KeyboardInterrupt("killed after shard 1")

    with pytest.raises(KeyboardInterrupt):
        generate_cots(prompts, tiny, cfg, tmp_path / "resumed", on_shard=boom)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    seen: list[int] = []
    again = generate_cots(prompts, tiny, cfg, tmp_path / "resumed", on_shard=lambda k, p: seen.append(k))
    assert seen == [2] and again.shards_reused == 2 and again.shards_written == 1
    a, b = read_cots(tmp_path / "full"), read_cots(tmp_path / "resumed")
    assert a.to_pylist() == b.to_pylist() and full.n_rows == b.num_rows == 5
    with pytest.raises(ValueError, match="written by config"):
        generate_cots(prompts, tiny, cfg.model_copy(update={"seed": 8}), tmp_path / "resumed")


def test_token_budget_stops_starting_shards(tiny: Path, prompts: Path, tmp_path: Path) -> None:
    first = pq.read_table(prompts).column("input_ids").to_pylist()[0]
    cfg = GenerateConfig(max_new_tokens=8, shard_size=1, token_budget=len(first) + 1, dtype="float32")
    s = generate_cots(prompts, tiny, cfg, tmp_path / "c")
    (row,) = read_cots(tmp_path / "c").to_pylist()  # shard 0 alone already covers the budget
    assert s.budget_reached and s.n_shards == 1 and s.n_rows == 1
    assert (s.prompt_tokens, s.completion_tokens) == (len(first), len(row["completion_ids"]))
    assert row["prompt_ids"] == first and s.prompt_tokens + s.completion_tokens >= cfg.token_budget


def test_bad_engine_and_too_long_prompt(prompts: Path) -> None:
    with pytest.raises(ValueError, match=r"'sglang'.*\['transformers', 'vllm'\]"):
        GenerateConfig(engine="sglang")
    with pytest.raises(UnknownEngineError, match=r"'sglang'.*\['transformers', 'vllm'\]"):
        make_engine("sglang", Path("."), eos_ids=[0], pad_id=0)
    with pytest.raises(PromptTooLongError, match="context window is 10"):
        build_requests(pq.read_table(prompts), GenerateConfig(), ctx=10)


def test_defaults_come_from_generation_config(tmp_path: Path) -> None:
    """Config values win, then the folder's generation_config.json, then FALLBACK_SAMPLING per key.
    (The values the shipped assets write are checked in tests/test_assets.py.)"""
    smol, qwen, bare = tmp_path / "smol", tmp_path / "qwen", tmp_path / "bare"
    for d in (smol, qwen, bare):
        d.mkdir()
    # SmolLM2's converted generation_config.json: no top_k, no repetition_penalty.
    (smol / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.2, "top_p": 0.9}))
    (qwen / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}))
    spec = gen_mod.resolve_sampling(GenerateConfig(top_p=0.5), smol)
    assert (spec.temperature, spec.top_p, spec.top_k, spec.repetition_penalty) == (0.2, 0.5, 0, 1.0)
    spec = gen_mod.resolve_sampling(GenerateConfig(), qwen, max_new_tokens=7)
    assert (spec.temperature, spec.top_p, spec.top_k, spec.repetition_penalty, spec.max_new_tokens) == (
        0.7, 0.8, 20, 1.05, 7)
    spec = gen_mod.resolve_sampling(GenerateConfig(temperature=0.0, top_k=5), bare)
    assert (spec.temperature, spec.top_p, spec.top_k, spec.repetition_penalty) == (0.0, 0.95, 5, 1.0)


class _Shared:
    """Hands generate_cots an already-loaded engine (one vLLM start per test module)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.name = engine, engine.name

    def generate(self, *a: Any) -> Any:
        return self.engine.generate(*a)

    def close(self) -> None:
        pass


@pytest.mark.slow
def test_vllm_and_transformers_on_the_same_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rac.data.engines import VLLMEngine

    md = smollm2_135m()
    pp = tmp_path / "prompts.parquet"
    sample_prompts(PromptsConfig(source="gsm8k", n=3, seed=2), md, pp)
    eos, pad = special_ids(md)
    original = torch.set_num_threads
    vllm = VLLMEngine(md, eos, dtype="float32", batch_size=4, max_model_len=1024, seed=0, threads=1)
    assert type(vllm.llm).__module__.startswith("vllm")
    monkeypatch.setattr(gen_mod, "make_engine", lambda name, *a, **k: _Shared(vllm) if name == "vllm" else
                        pytest.fail(f"unexpected engine {name}"))
    greedy = dict(max_new_tokens=24, temperature=0.0, dtype="float32", shard_size=2)
    sv = generate_cots(pp, md, GenerateConfig(engine="vllm", **greedy), tmp_path / "v")
    monkeypatch.undo()
    st = generate_cots(pp, md, GenerateConfig(engine="transformers", **greedy), tmp_path / "t")
    v, t = read_cots(tmp_path / "v"), read_cots(tmp_path / "t")
    assert sv.engine == "vllm" and st.engine == "transformers" and v.num_rows == t.num_rows == 3
    assert json.loads(pq.read_schema(tmp_path / "v" / "part-00000.parquet").metadata[b"rac.cots"])["engine"] == "vllm"
    assert json.loads(pq.read_schema(tmp_path / "t" / "part-00000.parquet").metadata[b"rac.cots"])["engine"] == (
        "transformers")
    tok = load_tokenizer(str(md))
    for rv, rt in zip(v.to_pylist(), t.to_pylist(), strict=True):
        assert tok.decode(rv["completion_ids"], skip_special_tokens=True) == rv["text"]
        assert rv["completion_ids"][:8] == rt["completion_ids"][:8]  # fp32 greedy: same model, same tokens
    req = Request(v.column("prompt_ids")[0].as_py(), seed=5, max_new_tokens=16)
    other = Request(v.column("prompt_ids")[1].as_py(), seed=6, max_new_tokens=16)
    once = vllm.generate([req], SPEC)[0]
    assert vllm.generate([other, req], SPEC)[1] == once
    stopped = bool(once.token_ids) and once.token_ids[-1] in eos
    assert once.finish_reason == ("stop" if stopped else "length")
    assert stopped or len(once.token_ids) == 16
    set_threads = torch.set_num_threads
    vllm.close()
    assert torch.set_num_threads is original and set_threads is not original and not torch.distributed.is_initialized()
    shutil.rmtree(tmp_path, ignore_errors=True)
