"""`group_col` of file prompt sources: validation, the prompts Parquet's groups, the split, and evaluation's
clustered bootstrap (variants of one template resampled together)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.data.generate import GenerateConfig
from rac.data.prompts import PromptsConfig, read_prompts_meta, sample_prompts
from rac.data.sources import MissingColumnError, load_records
from rac.eval.evaluate import ROWS_SCHEMA, EvalConfig, evaluate, summarise
from rac.models.assets import tiny_model

TEMPLATES, VARIANTS = 40, 3


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model("llama")


def write_variants(path: Path, templates: int = TEMPLATES, variants: int = VARIANTS) -> Path:
    """JSONL of `variants` rewordings of each of `templates` problems, with a `template` column."""
    rows = [{"id": f"t{t}-v{v}", "template": f"t{t}", "question": f"Variant {v}: what is {t} + {v}?",
             "answer": str(t + v)} for t in range(templates) for v in range(variants)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_group_col_sets_the_group_and_is_validated(tmp_path: Path) -> None:
    path = str(write_variants(tmp_path / "v.jsonl"))
    recs = load_records("file", path=path, id_col="id", group_col="template")
    assert [(r.problem_id, r.group_id) for r in recs[:4]] == [("t0-v0", "t0"), ("t0-v1", "t0"), ("t0-v2", "t0"),
                                                             ("t1-v0", "t1")]
    assert all(r.group_id == r.problem_id for r in load_records("file", path=path, id_col="id"))  # default
    with pytest.raises(MissingColumnError, match=r"group_col column 'family' not found in source .*; available "
                                                 r"columns: \['id', 'template', 'question', 'answer'\]"):
        load_records("file", path=path, id_col="id", group_col="family")
    with pytest.raises(ValueError, match="group_col='template' applies to sources 'file' and 'hf' only, not 'gsm8k'"):
        load_records("gsm8k", group_col="template")
    with pytest.raises(ValueError, match="group_col='template' applies to sources 'file' and 'hf' only"):
        PromptsConfig(source="gsm8k-symbolic", group_col="template")
    holes = tmp_path / "holes.jsonl"
    holes.write_text('{"id": "a", "question": "q1", "template": "x"}\n{"id": "b", "question": "q2", "template": null}\n')
    with pytest.raises(ValueError, match=r"group_col 'template' .* null or empty in 1 of 2 rows \(first: id 'b'\)"):
        load_records("file", path=str(holes), id_col="id", group_col="template")


def test_configs_without_group_col_keep_their_hashes() -> None:
    """Hashes taken on the commit before group_col existed: the prompts stage keys of old runs are unchanged."""
    assert PromptsConfig().stable_hash() == "8df83a3f51f8"
    assert PromptsConfig(source="file", path="x.jsonl", id_col="id").stable_hash() == "cdb11458e10c"
    with_col = PromptsConfig(source="file", path="x.jsonl", id_col="id", group_col="template")
    assert with_col.canonical()["group_col"] == "template" and with_col.stable_hash() != "cdb11458e10c"


def test_prompts_parquet_carries_the_template_groups_and_splits_by_them(tiny: Path, tmp_path: Path) -> None:
    path = str(write_variants(tmp_path / "v.jsonl"))
    base = dict(source="file", path=path, id_col="id", group_col="template")
    sides = {}
    for side in ("calib", "eval"):
        out = tmp_path / f"{side}.parquet"
        summary = sample_prompts(PromptsConfig(**base, holdout=side), tiny, out)  # type: ignore[arg-type]
        t = pq.read_table(out, columns=["prompt_id", "group_id"]).to_pylist()
        assert all(r["group_id"] == r["prompt_id"].split("-")[0] for r in t)
        assert summary.n_groups == len({r["group_id"] for r in t}) and summary.n_prompts == VARIANTS * summary.n_groups
        sides[side] = {r["group_id"] for r in t}
        assert read_prompts_meta(out)["config"]["group_col"] == "template"
    assert sides["calib"] and sides["eval"] and not sides["calib"] & sides["eval"]  # no template on both sides
    assert len(sides["calib"] | sides["eval"]) == TEMPLATES


def _rows(pids: list[str], correct: list[bool]) -> pa.Table:
    n = len(pids)
    return pa.table({"prompt_id": pids, "sample_index": pa.array([0] * n, pa.int32()), "gold": ["1"] * n,
                     "pred": ["1"] * n, "correct": correct, "completion_len": pa.array([5] * n, pa.int32()),
                     "finish_reason": ["stop"] * n, "text": [""] * n}, schema=ROWS_SCHEMA)


def test_evaluation_resamples_the_variants_of_a_template_together(tiny: Path, tmp_path: Path) -> None:
    """Scores shared by the variants of a template: the interval from the prompts Parquet's groups against a
    hand-rolled cluster bootstrap and against 2 z SE with SE = sd(template scores) / sqrt(templates)."""
    out = tmp_path / "all.parquet"
    sample_prompts(PromptsConfig(source="file", path=str(write_variants(tmp_path / "v.jsonl")), id_col="id",
                                 group_col="template"), tiny, out)
    table = pq.read_table(out, columns=["prompt_id", "group_id"])
    groups = dict(zip(table.column("prompt_id").to_pylist(), table.column("group_id").to_pylist(), strict=True))
    pids = sorted(groups)
    template_score = {f"t{t}": (t * 7) % 5 < 2 for t in range(TEMPLATES)}  # 16 of 40 templates solved
    rows = _rows(pids, [template_score[groups[p]] for p in pids])
    clustered, flat = summarise(rows, 20_000, 0, groups), summarise(rows, 20_000, 0)
    assert clustered["n_groups"] == TEMPLATES and flat["n_groups"] == TEMPLATES * VARIANTS
    rng = random.Random(5)  # the reference: pick whole templates with replacement, pool their variants
    by_template: dict[str, list[float]] = {}
    for p in pids:
        by_template.setdefault(groups[p], []).append(float(template_score[groups[p]]))
    keys = sorted(by_template)
    ref = []
    for _ in range(20_000):
        pooled = [x for k in (rng.choice(keys) for _ in keys) for x in by_template[k]]
        ref.append(sum(pooled) / len(pooled))
    lo, hi = np.quantile(ref, [0.025, 0.975])
    assert clustered["ci_low"] == pytest.approx(lo, abs=0.013) and clustered["ci_high"] == pytest.approx(hi, abs=0.013)
    scores = np.array([float(template_score[k]) for k in keys])
    width = 2 * 1.96 * scores.std() / np.sqrt(TEMPLATES)
    assert clustered["ci_high"] - clustered["ci_low"] == pytest.approx(width, rel=0.1)
    flat_width = flat["ci_high"] - flat["ci_low"]  # problems as if independent: sqrt(3) too narrow
    assert flat_width == pytest.approx(width / np.sqrt(VARIANTS), rel=0.1)


def test_evaluate_reports_the_template_clusters(tiny: Path, tmp_path: Path) -> None:
    pp = tmp_path / "eval.parquet"
    sample_prompts(PromptsConfig(source="file", path=str(write_variants(tmp_path / "v.jsonl", 2, 3)),
                                 id_col="id", group_col="template"), tiny, pp)
    gen = GenerateConfig(max_new_tokens=4, token_budget=None, dtype="float32")
    s = evaluate(tiny, EvalConfig(generation=gen, bootstrap=100), pp, tmp_path / "rows.parquet")
    assert s.n_problems == 6 and s.n_groups == 2
