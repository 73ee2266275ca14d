"""Calibration sets: packing rules, segment labels, budgets, decode share, and the real-model RAC share."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rac.data.calib import (
    CalibConfig,
    DecodeShareError,
    build_calibration,
    generic_texts,
    read_calibration_meta,
)
from rac.data.generate import GenerateConfig, generate_cots, read_cots, special_ids
from rac.data.prompts import PromptsConfig, sample_prompts
from rac.data.segments import CALIB_META_KEY, CALIB_SCHEMA, SEGMENT_IDS
from rac.data.templates import load_tokenizer
from rac.models.assets import smollm2_135m, tiny_model

P, D, OTH = SEGMENT_IDS["prompt"], SEGMENT_IDS["decode"], SEGMENT_IDS["other"]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def run(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("run")
    sample_prompts(PromptsConfig(source="gsm8k", n=6, seed=3), tiny, d / "prompts.parquet")
    generate_cots(d / "prompts.parquet", tiny, GenerateConfig(max_new_tokens=40, shard_size=3, dtype="float32"),
                  d / "cots")
    return d


def _rows(path: Path) -> list[dict]:
    t = pq.read_table(path)
    assert t.schema.remove_metadata().equals(CALIB_SCHEMA)
    return t.to_pylist()


def test_generic_is_the_shipped_news_text_in_windows(tiny: Path, tmp_path: Path) -> None:
    texts = generic_texts()
    assert len(texts) == 350 and "bushfire" in " ".join(texts)
    s = build_calibration(CalibConfig(kind="generic", token_budget=1000, max_seq_len=128), tiny, tmp_path / "g.parquet")
    rows = _rows(tmp_path / "g.parquet")
    assert s.n_tokens == 1000 and s.other_share == 1.0 and not s.exhausted
    assert all(len(r["input_ids"]) <= 128 and set(r["segment"]) == {OTH} for r in rows)
    tok = load_tokenizer(str(tiny))
    eos = special_ids(tiny)[0][0]
    stream = [t for r in rows for t in r["input_ids"]]
    first_doc = stream[: stream.index(eos)]
    assert tok.decode(first_doc) in texts


def test_generic_reports_exhaustion(tiny: Path, tmp_path: Path) -> None:
    s = build_calibration(CalibConfig(kind="generic", token_budget=10**8, max_seq_len=4096), tiny, tmp_path / "g.parquet")
    # Hand count: every article's tokens plus one EOS each, all of them taken.
    tok = load_tokenizer(str(tiny))
    texts = generic_texts()
    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert s.exhausted and s.n_tokens == total == sum(len(r["input_ids"]) for r in _rows(tmp_path / "g.parquet"))
    assert s.n_seqs == -(-total // 4096)
    assert read_calibration_meta(tmp_path / "g.parquet")["exhausted"] is True


def test_prompt_set_holds_the_templated_prompts(tiny: Path, run: Path, tmp_path: Path) -> None:
    s = build_calibration(CalibConfig(kind="prompt", token_budget=10**6), tiny, tmp_path / "p.parquet",
                          prompts_path=run / "prompts.parquet")
    got = sorted(tuple(r["input_ids"]) for r in _rows(tmp_path / "p.parquet"))
    want = sorted(tuple(x) for x in pq.read_table(run / "prompts.parquet").column("input_ids").to_pylist())
    assert got == want and s.prompt_share == 1.0 and s.exhausted


def test_rac_set_is_prompt_then_exact_cot_ids(tiny: Path, run: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    s = build_calibration(CalibConfig(kind="rac", token_budget=10**6, min_decode_share=0.0), tiny, out,
                          cots_dir=run / "cots")
    cots = {f"cot:{r['cot_id']}": r for r in read_cots(run / "cots").to_pylist()}
    rows = _rows(out)
    assert len(rows) == len(cots)
    n_dec = 0
    for r in rows:
        c = cots[r["source"]]
        assert r["input_ids"] == c["prompt_ids"] + c["completion_ids"]
        assert r["segment"] == [P] * c["prompt_len"] + [D] * c["completion_len"]
        n_dec += c["completion_len"]
    meta = json.loads(pq.read_schema(out).metadata[CALIB_META_KEY])
    assert meta["decode_share"] == pytest.approx(n_dec / s.n_tokens) == pytest.approx(s.decode_share)
    assert meta["kind"] == "rac" and meta["template"]["name"] == "instruct"


def test_rac_budget_and_truncation_never_split_cot_from_prompt(tiny: Path, run: Path, tmp_path: Path) -> None:
    plen = read_cots(run / "cots").column("prompt_len").to_pylist()
    cap = max(plen) + 10
    s = build_calibration(CalibConfig(kind="rac", token_budget=2 * cap + 5, max_seq_len=cap, min_decode_share=0.0),
                          tiny, tmp_path / "r.parquet", cots_dir=run / "cots")
    rows = _rows(tmp_path / "r.parquet")
    assert s.n_tokens <= 2 * cap + 5 and not s.exhausted
    for r in rows:
        assert len(r["input_ids"]) <= cap and r["segment"][0] == P and r["segment"][-1] == D
        k = r["segment"].index(D)
        assert set(r["segment"][:k]) == {P} and set(r["segment"][k:]) == {D}


def test_rac_below_min_decode_share_raises_and_writes_nothing(tiny: Path, run: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    with pytest.raises(DecodeShareError, match=r"decode share 0\.\d+ < min_decode_share 0.99"):
        build_calibration(CalibConfig(kind="rac", min_decode_share=0.99), tiny, out, cots_dir=run / "cots")
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="needs cots_dir"):
        build_calibration(CalibConfig(kind="rac"), tiny, out)


def test_self_set_samples_from_bos(tiny: Path, tmp_path: Path) -> None:
    cfg = CalibConfig(kind="self", token_budget=60, max_seq_len=25,
                      self_generation=GenerateConfig(max_new_tokens=30, dtype="float32"))
    s = build_calibration(cfg, tiny, tmp_path / "s.parquet")
    bos = load_tokenizer(str(tiny)).bos_token_id
    rows = _rows(tmp_path / "s.parquet")
    assert s.n_tokens == 60 and all(len(r["input_ids"]) <= 25 for r in rows)
    for r in rows:
        assert r["input_ids"][0] == bos and r["segment"][0] == OTH and set(r["segment"][1:]) <= {D}


@pytest.mark.slow
def test_real_model_rac_set_is_mostly_decode(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct on GSM8K prompts: its own CoTs dominate the RAC calibration tokens."""
    md = smollm2_135m()
    sample_prompts(PromptsConfig(source="gsm8k-symbolic", n=6, seed=0, holdout="calib"), md, tmp_path / "p.parquet")
    g = generate_cots(tmp_path / "p.parquet", md, GenerateConfig(max_new_tokens=256, shard_size=6, batch_size=6, dtype="float32"),
                      tmp_path / "cots")
    s = build_calibration(CalibConfig(kind="rac", token_budget=10**6), md, tmp_path / "rac.parquet",
                          cots_dir=tmp_path / "cots")
    print(f"\nSmolLM2 RAC set: {s.n_tokens} tokens, decode share {s.decode_share:.3f}, "
          f"{g.completion_tokens} CoT tokens in {g.wall_s:.0f}s")
    assert s.decode_share >= 0.5
    assert read_calibration_meta(tmp_path / "rac.parquet")["decode_share"] == pytest.approx(s.decode_share)
