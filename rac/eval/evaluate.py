"""Evaluation stage: a dense or pruned model answers an eval prompts file; answers are graded and summarised.

The prompts file is templated once (rac.data.prompts) with the calibration template; evaluation refuses a
prompts file whose template hash differs from the calibration's (`expect_template_hash`, an argument), and re-renders the template with the
evaluated model's tokenizer to check it still produces the same fingerprint. Generation reuses
`generate_cots` (same engines, seeds and shard resume) into `<out_path stem>.cots/`.

Metrics: accuracy = pass@1 averaged over the n samples of each problem, then over problems, with a 95%
percentile-bootstrap interval over problems; mean/median/p90 completion tokens; the share of samples that hit
the token cap (runaway CoTs); generation wall time and new tokens/s. Per-sample rows go to `out_path`
(Parquet), the summary to `out_path` with suffix .json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from rac.config import StageConfig
from rac.data.generate import GenerateConfig, generate_cots, read_cots
from rac.data.io import atomic_write_table
from rac.data.prompts import read_prompts_meta
from rac.data.templates import TemplateConfig, TemplateError, load_tokenizer, template_info
from rac.eval.grade import grade
from rac.store.artifacts import atomic_write_text

ROWS_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("gold", pa.string(), nullable=False),
        pa.field("pred", pa.string(), nullable=True),
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("completion_len", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)


class EvalConfig(StageConfig):
    """How a model is evaluated: generation settings, the interval's bootstrap, grading threads.

    What is evaluated (the prompts file, the template hash it must carry) are arguments of `evaluate`."""

    generation: GenerateConfig = GenerateConfig(max_new_tokens=2048, token_budget=None)
    bootstrap: int = Field(default=2000, ge=100)
    seed: int = 0
    grade_threads: int = Field(default=2, ge=1)

    @field_validator("generation")
    @classmethod
    def _no_budget(cls, v: GenerateConfig) -> GenerateConfig:
        if v.token_budget is not None:
            raise ValueError(f"evaluation covers every prompt: generation.token_budget must be None, "
                             f"got {v.token_budget}")
        return v


@dataclass(frozen=True)
class EvalSummary:
    """Per-model evaluation metrics."""

    model: str
    n_problems: int
    n_groups: int  # clusters the interval resamples (problems, or original problems of template variants)
    n_samples: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_tokens: float
    median_tokens: float
    p90_tokens: float
    runaway_share: float  # share of samples that hit the token cap
    wall_s: float
    tokens_per_s: float
    template: dict[str, str]
    rows_path: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def bootstrap_means(scores: np.ndarray, n_boot: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """[n_boot] means of per-problem `scores` over bootstrap resamples of the problems or, with `groups` (one
    cluster id per problem, e.g. the GSM8K problem a template variant comes from), of whole clusters."""
    scores = np.asarray(scores, dtype=np.float64)  # [P]
    _, g = np.unique(np.arange(scores.size) if groups is None else np.asarray(groups), return_inverse=True)
    if g.shape != scores.shape:
        raise ValueError(f"groups need one id per score: {g.shape} ids for {scores.shape} scores")
    sums, counts = np.bincount(g, weights=scores), np.bincount(g)  # [G], [G]
    idx = np.random.default_rng(seed).integers(0, sums.size, size=(n_boot, sums.size))  # [B, G]
    return sums[idx].sum(axis=1) / counts[idx].sum(axis=1)  # [B]


def bootstrap_interval(per_problem: np.ndarray, n_boot: int, seed: int, level: float = 0.95,
                       groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-problem scores (resampling problems, or clusters of
    problems when `groups` is given)."""
    means = bootstrap_means(per_problem, n_boot, seed, groups)  # [B]
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _check_template(model_dir: Path, meta: dict[str, Any], expect: str | None) -> dict[str, str]:
    """The prompts' template fingerprint, verified against `expect` and the model's own tokenizer."""
    stored = meta.get("template") or {}
    if expect is not None and stored.get("hash") != expect:
        raise TemplateError(f"eval prompts use template {stored} but calibration used hash {expect!r}")
    tcfg = TemplateConfig(**meta["config"]["template"])
    mine = template_info(load_tokenizer(str(model_dir)), tcfg)
    if mine["hash"] != stored.get("hash"):
        raise TemplateError(f"model {model_dir} renders template {mine}, prompts were made with {stored}")
    return dict(stored)


def score_rows(cots: pa.Table, gold: dict[str, str], threads: int) -> pa.Table:
    """Grade every completion (in `threads` worker threads) into per-sample rows."""
    texts = cots.column("text").to_pylist()
    pids = cots.column("prompt_id").to_pylist()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        grades = list(pool.map(lambda tp: grade(tp[0], gold[tp[1]]), zip(texts, pids, strict=True)))
    return pa.table(
        {"prompt_id": pids, "sample_index": cots.column("sample_index"), "gold": [gold[p] for p in pids],
         "pred": [g.pred for g in grades], "correct": [g.correct for g in grades],
         "completion_len": cots.column("completion_len"), "finish_reason": cots.column("finish_reason"),
         "text": texts},
        schema=ROWS_SCHEMA,
    )


def summarise(rows: pa.Table, n_boot: int, seed: int, groups: dict[str, str] | None = None) -> dict[str, float]:
    """Accuracy with interval, token statistics and runaway share (samples that hit the cap) of graded rows; `groups` (prompt id -> group id)
    makes the interval resample groups of related problems (template variants) together."""
    pids = np.array(rows.column("prompt_id").to_pylist())
    correct = np.array(rows.column("correct").to_pylist(), dtype=np.float64)
    lens = np.array(rows.column("completion_len").to_pylist(), dtype=np.float64)
    uniq, inv = np.unique(pids, return_inverse=True)
    per_problem = np.bincount(inv, weights=correct) / np.bincount(inv)  # [P]
    clusters = np.array([groups.get(str(p), str(p)) for p in uniq]) if groups else None  # [P]
    lo, hi = bootstrap_interval(per_problem, n_boot, seed, groups=clusters)
    return {"n_problems": len(uniq), "n_groups": len(set(clusters)) if clusters is not None else len(uniq),
            "n_samples": len(correct), "accuracy": float(per_problem.mean()),
            "ci_low": lo, "ci_high": hi, "mean_tokens": float(lens.mean()),
            "median_tokens": float(np.median(lens)), "p90_tokens": float(np.percentile(lens, 90)),
            "runaway_share": rows.column("finish_reason").to_pylist().count("length") / len(correct)}


def eval_cots_dir(rows_path: Path) -> Path:
    """The folder of CoT shards (exact prompt + completion ids) behind an evaluation's rows Parquet."""
    rows_path = Path(rows_path)
    return rows_path.with_name(rows_path.stem + ".cots")


def evaluate(model_dir: Path, cfg: EvalConfig, prompts_path: Path, out_path: Path,
             expect_template_hash: str | None = None,
             on_shard: Callable[[int, Path], None] | None = None) -> EvalSummary:
    """Generate, grade and summarise `model_dir` on `prompts_path`; rows to `out_path`, summary JSON beside.

    `expect_template_hash`: the calibration prompts' template hash the eval prompts must carry (None: any).
    Generation shards already in `eval_cots_dir(out_path)` with the same config are kept (resume);
    `on_shard(k, path)` is called after each new shard lands."""
    prompts_path = Path(prompts_path)
    meta = read_prompts_meta(prompts_path)
    info = _check_template(model_dir, meta, expect_template_hash)
    prompts = pq.read_table(prompts_path, columns=["prompt_id", "group_id", "answer"])
    pids = prompts.column("prompt_id").to_pylist()
    gold = dict(zip(pids, prompts.column("answer").to_pylist(), strict=True))
    groups = dict(zip(pids, prompts.column("group_id").to_pylist(), strict=True))
    out_path = Path(out_path)
    gen = generate_cots(prompts_path, model_dir, cfg.generation, eval_cots_dir(out_path), on_shard=on_shard)
    rows = score_rows(read_cots(gen.out_dir), gold, cfg.grade_threads)
    atomic_write_table(rows, out_path)
    summary = EvalSummary(model=str(model_dir), **summarise(rows, cfg.bootstrap, cfg.seed, groups),  # type: ignore[arg-type]
                          wall_s=gen.wall_s, tokens_per_s=gen.new_tokens_per_s, template=info,
                          rows_path=str(out_path))
    atomic_write_text(out_path.with_suffix(".json"), summary.to_json())
    return summary
