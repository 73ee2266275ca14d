"""Prompt sources, deterministic sampling, disjoint splits and bad-input errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.data import sources
from rac.data.prompts import PromptsConfig, PromptTooLongError, read_prompts_meta, sample_prompts
from rac.data.sources import EmptySourceError, MissingColumnError, load_records
from rac.models.assets import tiny_model


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model("llama")


def test_gsm8k_originals_are_the_100_problems() -> None:
    recs = load_records("gsm8k")
    assert len(recs) == 100 and len({r.group_id for r in recs}) == 100
    shark = next(r for r in recs if r.problem_id == "gsm8k-473")
    assert "10-foot shark" in shark.question and shark.answer == "10"
    assert all(r.answer.lstrip("-").replace(".", "", 1).isdigit() for r in recs)


def test_gsm8k_symbolic_variants_are_seeded_and_exclude_originals() -> None:
    originals = {r.group_id: r.question for r in load_records("gsm8k")}
    a = load_records("gsm8k-symbolic", variants=2, seed=3)
    b = load_records("gsm8k-symbolic", variants=1, seed=3)
    c = load_records("gsm8k-symbolic", variants=1, seed=4)
    first_per_group = [r for i, r in enumerate(a) if i == 0 or a[i - 1].group_id != r.group_id]
    assert b == first_per_group and b != c
    assert len(a) == 200 and all(r.question != originals[r.group_id] for r in a)
    assert {r.group_id for r in a} == set(originals)


def test_rejection_sampler_only_draws_valid_assignments() -> None:
    """Reference: the package's own full enumeration of valid assignments for the fast template 0."""
    from multilingual_gsm_symbolic import load_data, load_replacements

    t = next(x for x in load_data("eng") if x.id_shuffled == 0)
    rep = load_replacements("eng")
    valid = t._evaluate_constrained_init_lines(t.constrained_lines, rep)
    keys = {json.dumps(v, sort_keys=True, default=str) for v in valid}
    pools = t._get_all_possible_assignments(t.constrained_lines, rep)
    rng = random.Random(0)
    drawn = [sources._sample_assignment(t, pools, rng) for _ in range(40)]
    assert all(json.dumps(d, sort_keys=True, default=str) in keys for d in drawn)
    assert len({json.dumps(d, sort_keys=True, default=str) for d in drawn}) > 5


def test_champ_problems() -> None:
    recs = load_records("champ")
    assert len(recs) == 270
    first = next(r for r in recs if r.problem_id == "P_Combinatorics_1")
    assert first.answer == "239" and "length 6" in first.question


def test_joined_offline_sources() -> None:
    sym = load_records("gsm8k-symbolic", variants=2, seed=1)
    champ = load_records("champ")
    both = load_records("gsm8k-symbolic+champ", variants=2, seed=1)
    assert [(r.problem_id, r.question) for r in both] == [(r.problem_id, r.question) for r in sym + champ]
    with pytest.raises(ValueError, match="'file'"):
        load_records("gsm8k+file")


def test_file_sources_through_fsspec(tmp_path: Path) -> None:
    rows = [{"q": f"What is {i}+1?", "a": str(i + 1), "id": f"p{i}"} for i in range(5)]
    table = pa.Table.from_pylist(rows)
    with fsspec.open("memory://rac-test/p.parquet", "wb") as f:
        pq.write_table(table, f)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.csv").write_text("q,a,id\n" + "\n".join(f"{r['q']},{r['a']},{r['id']}" for r in rows))
    for url in ("memory://rac-test/p.parquet", f"file://{tmp_path}/p.jsonl", str(tmp_path / "p.csv")):
        recs = load_records("file", path=url, question_col="q", answer_col="a", id_col="id")
        assert [(r.problem_id, r.question, r.answer) for r in recs] == [(r["id"], r["q"], r["a"]) for r in rows]


def test_datasets_folder_source(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"question": ["1+1?", "2+2?"], "answer": ["2", "4"]}).save_to_disk(tmp_path / "ds")
    recs = load_records("hf", path=str(tmp_path / "ds"))
    assert [r.answer for r in recs] == ["2", "4"]


def test_missing_column_names_it_and_lists_available(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(json.dumps({"problem": "x", "solution": "1"}))
    with pytest.raises(MissingColumnError, match=r"'question'.*\['problem', 'solution'\]"):
        load_records("file", path=str(tmp_path / "p.jsonl"))


def test_empty_dataset_and_unknown_source(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(EmptySourceError, match="no rows"):
        load_records("file", path=str(tmp_path / "e.jsonl"))
    with pytest.raises(ValueError, match="unknown prompt source 'gsm9k'.*champ"):
        load_records("gsm9k")


def test_sample_prompts_is_deterministic_and_tokenises_the_template(tiny: Path, tmp_path: Path) -> None:
    from rac.data.templates import load_tokenizer

    cfg = PromptsConfig(source="gsm8k", n=7, seed=5)
    s1 = sample_prompts(cfg, tiny, tmp_path / "a.parquet")
    sample_prompts(cfg, tiny, tmp_path / "b.parquet")
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.equals(b) and a.num_rows == s1.n_prompts == 7
    tok = load_tokenizer(str(tiny))
    for text, ids in zip(a.column("text").to_pylist(), a.column("input_ids").to_pylist(), strict=True):
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
    meta = read_prompts_meta(tmp_path / "a.parquet")
    assert meta["template"] == s1.template and meta["config_hash"] == cfg.stable_hash()


def test_calib_and_eval_splits_are_disjoint(tiny: Path, tmp_path: Path) -> None:
    base = dict(source="gsm8k-symbolic", variants=2, template={"style": "r1"})
    cal = sample_prompts(PromptsConfig(**base, holdout="calib"), tiny, tmp_path / "cal.parquet")
    ev = sample_prompts(PromptsConfig(**base, holdout="eval"), tiny, tmp_path / "ev.parquet")
    gc = set(pq.read_table(tmp_path / "cal.parquet").column("group_id").to_pylist())
    ge = set(pq.read_table(tmp_path / "ev.parquet").column("group_id").to_pylist())
    assert not gc & ge and len(gc | ge) == 100 and cal.n_prompts + ev.n_prompts == 200
    ex = sample_prompts(PromptsConfig(source="gsm8k", exclude_from=(str(tmp_path / "cal.parquet"),)), tiny,
                        tmp_path / "ex.parquet")
    gx = set(pq.read_table(tmp_path / "ex.parquet").column("group_id").to_pylist())
    assert gx == ge and ex.n_prompts == len(ge)


def test_prompt_longer_than_context_is_an_error_and_writes_nothing(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    with pytest.raises(PromptTooLongError) as err:
        sample_prompts(PromptsConfig(source="gsm8k", n=2, max_prompt_tokens=20), tiny, out)
    assert not out.exists() and not list(tmp_path.iterdir())
    # Reference: the same draw without the limit; its first prompt is the one named, with its token count.
    sample_prompts(PromptsConfig(source="gsm8k", n=2), tiny, tmp_path / "ok.parquet")
    first = pq.read_table(tmp_path / "ok.parquet").to_pylist()[0]
    assert len(first["input_ids"]) >= 20
    assert str(err.value) == (f"prompt {first['prompt_id']!r} has {len(first['input_ids'])} tokens, "
                              "context window/limit is 20")
