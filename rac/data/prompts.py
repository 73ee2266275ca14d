"""Prompt stage: load a source, split/exclude by problem group, sample by seed, template, tokenise.

Output `prompts.parquet` (one row per prompt, written atomically):
  prompt_id string, group_id string, source string, question string, answer string,
  text string (the rendered chat prompt), input_ids list<int32> (its token ids)
with schema metadata b"rac.prompts" = JSON {template: {name, hash}, tokenizer, config_hash, n}.

Groups: a prompt's `group_id` is the problem it derives from (a GSM8K variant: its original problem; a
`file`/`hf` row: its own id, or the value of `group_col`, e.g. the template its variants share). The split,
the exclusion and evaluation's clustered bootstrap all work on groups.

Disjointness of calibration and evaluation prompts:
  * `split`="calib"/"eval" keeps the groups whose hash falls outside/inside `eval_fraction`
    (a GSM8K variant belongs to its original problem's group), so the two never share a problem;
  * `exclude_from` drops every group already present in other prompts files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from rac.config import StageConfig
from rac.data.io import atomic_write_table, read_table_meta
from rac.data.sources import EmptySourceError, Record, in_eval_split, load_records
from rac.data.templates import TemplateConfig, context_window, encode_prompt, load_tokenizer, template_info

PROMPTS_META_KEY = b"rac.prompts"
PROMPTS_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    ]
)


class PromptTooLongError(ValueError):
    """A templated prompt does not fit the model's context window."""


class PromptsConfig(StageConfig):
    """Which problems become prompts, and how they are templated."""

    source: str = "gsm8k-symbolic"
    path: str | None = None
    split: str = "train"
    fmt: str | None = None
    question_col: str = "question"
    answer_col: str = "answer"
    id_col: str | None = None
    # file / hf: the column naming each row's group (None: every row its own group); left out of the
    # canonical config when unset, so configs without it keep their hashes
    group_col: str | None = Field(default=None, exclude_if=lambda v: v is None)
    variants: int = Field(default=1, ge=1)
    keep_original: bool = False
    n: int | None = Field(default=None, ge=1)
    seed: int = 0
    holdout: Literal["all", "calib", "eval"] = "all"
    eval_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    exclude_from: tuple[str, ...] = ()
    template: TemplateConfig = TemplateConfig()
    max_prompt_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _group_col_source(self) -> PromptsConfig:
        if self.group_col is not None and self.source not in ("file", "hf"):
            raise ValueError(f"group_col={self.group_col!r} applies to sources 'file' and 'hf' only, "
                             f"not source={self.source!r} (the shipped sets carry their own groups)")
        return self


@dataclass(frozen=True)
class PromptsSummary:
    """What the prompt stage wrote."""

    path: Path
    n_prompts: int
    n_groups: int
    n_tokens: int
    max_prompt_len: int
    template: dict[str, str]


def select_prompts(records: list[Record], cfg: PromptsConfig) -> list[Record]:
    """Split/exclude by group, then a seeded sample of `cfg.n` (all when n is None), in sampled order."""
    excluded: set[str] = set()
    for other in cfg.exclude_from:
        excluded |= set(pq.read_table(other, columns=["group_id"]).column("group_id").to_pylist())
    keep = [
        r for r in records
        if r.group_id not in excluded
        and (cfg.holdout == "all" or in_eval_split(r.group_id, cfg.eval_fraction) == (cfg.holdout == "eval"))
    ]
    if not keep:
        raise EmptySourceError(
            f"no prompts left from {cfg.source!r} after holdout={cfg.holdout!r} and exclusion of "
            f"{len(excluded)} groups from {list(cfg.exclude_from)}"
        )
    order = list(range(len(keep)))
    random.Random(cfg.seed).shuffle(order)
    return [keep[i] for i in order[: cfg.n or len(keep)]]


def sample_prompts(cfg: PromptsConfig, model_dir: Path, out_path: Path) -> PromptsSummary:
    """Build prompts.parquet at `out_path` from `cfg` with `model_dir`'s tokenizer and chat template."""
    records = load_records(
        cfg.source, path=cfg.path, split=cfg.split, fmt=cfg.fmt, question_col=cfg.question_col,
        answer_col=cfg.answer_col, id_col=cfg.id_col, variants=cfg.variants, seed=cfg.seed,
        keep_original=cfg.keep_original, group_col=cfg.group_col,
    )
    chosen = select_prompts(records, cfg)
    ids_seen = [r.problem_id for r in chosen]
    if len(set(ids_seen)) != len(ids_seen):
        dup = next(i for i in ids_seen if ids_seen.count(i) > 1)
        raise ValueError(f"duplicate problem id {dup!r} in source {cfg.source!r}; map a unique id_col")
    tok = load_tokenizer(str(model_dir))
    limit = cfg.max_prompt_tokens or context_window(model_dir)
    texts, ids = [], []
    for r in chosen:
        text, tids = encode_prompt(tok, r.question, cfg.template)
        if len(tids) >= limit:
            raise PromptTooLongError(
                f"prompt {r.problem_id!r} has {len(tids)} tokens, context window/limit is {limit}"
            )
        texts.append(text)
        ids.append(tids)
    info = template_info(tok, cfg.template)
    table = pa.table(
        {
            "prompt_id": [r.problem_id for r in chosen], "group_id": [r.group_id for r in chosen],
            "source": [r.source for r in chosen], "question": [r.question for r in chosen],
            "answer": [r.answer for r in chosen], "text": texts, "input_ids": ids,
        },
        schema=PROMPTS_SCHEMA,
    )
    meta = {"template": info, "tokenizer": str(getattr(tok, "name_or_path", "")),
            "config_hash": cfg.stable_hash(), "config": cfg.canonical(), "n": len(chosen)}
    atomic_write_table(table.replace_schema_metadata({PROMPTS_META_KEY: json.dumps(meta)}), out_path)
    return PromptsSummary(
        path=out_path, n_prompts=len(chosen), n_groups=len({r.group_id for r in chosen}),
        n_tokens=sum(len(x) for x in ids), max_prompt_len=max(len(x) for x in ids), template=info,
    )


def read_prompts_meta(path: Path) -> dict:
    """The JSON metadata of a prompts.parquet (template, tokenizer, config)."""
    return read_table_meta(path, PROMPTS_META_KEY)
