"""Evaluation metrics, interval, template checks and the end-to-end stage on a tiny model."""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.data.generate import GenerateConfig
from rac.data.prompts import PromptsConfig, read_prompts_meta, sample_prompts
from rac.data.templates import TemplateError
from rac.eval.evaluate import EvalConfig, bootstrap_interval, bootstrap_means, evaluate, score_rows, summarise
from rac.models.assets import tiny_model


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model("llama")


def test_bootstrap_interval_matches_normal_approximation() -> None:
    rng = np.random.default_rng(1)
    scores = (rng.random(400) < 0.3).astype(float)
    lo, hi = bootstrap_interval(scores, 4000, seed=0)
    se = scores.std() / np.sqrt(len(scores))
    assert lo < scores.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert bootstrap_interval(np.ones(10), 500, seed=0) == (1.0, 1.0)


def test_cluster_bootstrap_matches_exact_enumeration() -> None:
    """Resampling whole clusters (variants of one problem) against every one of the G^G cluster resamples."""
    scores = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    groups = np.array(["a", "a", "a", "b", "c", "c", "d"])
    sums, counts = {"a": 2.0, "b": 1.0, "c": 0.0, "d": 1.0}, {"a": 3, "b": 1, "c": 2, "d": 1}
    keys = sorted(sums)
    exact = [sum(sums[keys[i]] for i in ix) / sum(counts[keys[i]] for i in ix)
             for ix in itertools.product(range(4), repeat=4)]
    means = bootstrap_means(scores, 200_000, seed=3, groups=groups)
    assert np.quantile(means, [0.025, 0.5, 0.975]) == pytest.approx(np.quantile(exact, [0.025, 0.5, 0.975]), abs=0.02)
    assert np.mean(means) == pytest.approx(np.mean(exact), abs=0.003)
    singles = bootstrap_means(scores, 500, seed=0)  # no groups: each problem is its own cluster
    assert np.array_equal(singles, bootstrap_means(scores, 500, seed=0, groups=np.arange(7)))
    assert bootstrap_interval(scores, 2000, 0, groups=groups)[1] - bootstrap_interval(scores, 2000, 0, groups=groups)[0] \
        > bootstrap_interval(scores, 2000, 0)[1] - bootstrap_interval(scores, 2000, 0)[0]  # correlated: wider
    with pytest.raises(ValueError, match="one id per score"):
        bootstrap_means(scores, 10, 0, groups=groups[:3])


def test_score_and_summarise_against_hand_counts() -> None:
    texts = ["\\boxed{2}", "\\boxed{3}", "\\boxed{1/2}", "no answer", "\\boxed{0.5}", "\\boxed{7}"]
    pids = ["a", "a", "b", "b", "c", "c"]
    lens = [10, 20, 30, 40, 50, 200]
    fins = ["stop", "stop", "stop", "length", "stop", "length"]
    cots = pa.table({"prompt_id": pids, "sample_index": pa.array([0, 1] * 3, pa.int32()), "text": texts,
                     "completion_len": pa.array(lens, pa.int32()), "finish_reason": fins})
    rows = score_rows(cots, {"a": "2", "b": "0.5", "c": "7"}, threads=2)
    assert rows.column("correct").to_pylist() == [True, False, True, False, False, True]
    s = summarise(rows, 500, 0)
    assert s["accuracy"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert s["n_problems"] == 3 and s["n_samples"] == 6 and s["runaway_share"] == pytest.approx(2 / 6)
    assert s["mean_tokens"] == pytest.approx(sum(lens) / 6) and s["median_tokens"] == statistics.median(lens)
    assert s["p90_tokens"] == pytest.approx(statistics.quantiles(lens, n=10, method="inclusive")[-1])
    g = summarise(rows, 500, 0, groups={"a": "x", "b": "x", "c": "y"})
    assert g["n_groups"] == 2 and s["n_groups"] == 3 and g["accuracy"] == s["accuracy"]


def test_evaluate_end_to_end_on_tiny_model(tiny: Path, tmp_path: Path) -> None:
    pp = tmp_path / "eval_prompts.parquet"
    sample_prompts(PromptsConfig(source="gsm8k", n=3, holdout="eval"), tiny, pp)
    thash = read_prompts_meta(pp)["template"]["hash"]
    gen = GenerateConfig(max_new_tokens=8, samples_per_prompt=2, token_budget=None, dtype="float32")
    s = evaluate(tiny, EvalConfig(generation=gen), pp, tmp_path / "dense.parquet", expect_template_hash=thash)
    rows = pq.read_table(tmp_path / "dense.parquet")
    assert rows.num_rows == 6 == s.n_samples and s.n_problems == 3
    assert s.template["hash"] == thash and 0.0 <= s.ci_low <= s.accuracy <= s.ci_high <= 1.0
    assert s.runaway_share == pytest.approx(rows.column("finish_reason").to_pylist().count("length") / 6)
    assert json.loads((tmp_path / "dense.json").read_text())["n_samples"] == 6
    assert s.wall_s > 0 and s.tokens_per_s > 0


def test_evaluate_refuses_a_different_template(tiny: Path, tmp_path: Path) -> None:
    pp = tmp_path / "p.parquet"
    sample_prompts(PromptsConfig(source="gsm8k", n=1), tiny, pp)
    with pytest.raises(TemplateError, match="calibration used hash '0000000000000000'"):
        evaluate(tiny, EvalConfig(), pp, tmp_path / "x.parquet", expect_template_hash="0" * 16)
    other = tmp_path / "other_model"
    shutil.copytree(tiny, other)
    jinja = other / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text("SYSTEM " + jinja.read_text())
    else:
        tc = json.loads((other / "tokenizer_config.json").read_text())
        tc["chat_template"] = "SYSTEM " + tc["chat_template"]
        (other / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(TemplateError, match="renders template"):
        evaluate(other, EvalConfig(), pp, tmp_path / "y.parquet")
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "y.parquet").exists()


def test_eval_config_rejects_a_token_budget() -> None:
    with pytest.raises(ValueError, match="token_budget must be None"):
        EvalConfig(generation=GenerateConfig(token_budget=1000))
