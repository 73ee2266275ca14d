"""Calibration sets: token-id sequences with a per-token segment label (`rac.data.segments.CALIB_SCHEMA`).

Kinds and their labels:
  generic  plain English news text shipped in the `gensim` wheel (Lee corpus, 350 ABC news articles; an
           offline stand-in for C4), all tokens "other". Articles are shuffled by seed, joined with the EOS
           id into one stream and cut into windows of `max_seq_len` tokens.
  prompt   the templated prompts of a prompts.parquet, one sequence each, all tokens "prompt".
  rac      prompt ids + the dense model's own sampled CoT ids from a cots folder: prompt tokens "prompt",
           CoT tokens "decode". The exact stored ids are used, never re-tokenised text.
  self     unconditional samples of the model started from its BOS id (EOS id when it has no BOS): the start
           token is "other", every sampled token "decode" (they are on-policy decode tokens, with no prompt).
Packing rules, all kinds: sequences are taken in a seeded order; a sequence longer than `max_seq_len` is
truncated at the end (for `rac` only the CoT tail is cut: a CoT is never separated from its prompt, and a
prompt that alone fills `max_seq_len` is skipped and counted); sequences are added until `token_budget` total
tokens, the last one truncated to land exactly on the budget (for `rac` only while it keeps its whole prompt
and at least one CoT token). A source that runs out before the budget is recorded as `exhausted`.
The schema metadata JSON (CALIB_META_KEY) records kind, tokenizer, n_tokens, segment shares, the template and
the source files. A `rac` set whose decode share is below `min_decode_share` raises DecodeShareError.
`progressive` (ProgressiveConfig, `rac` only) asks for progressive on-policy RAC: the run regenerates the CoTs
with partly pruned models between sparsity steps (rac.runs.progressive, docs/progressive.md); each of its sets
is an ordinary `rac` set built here with `one_shot()`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, ValidationInfo, field_validator

from rac.config import StageConfig
from rac.data.engines import Request, make_engine
from rac.data.generate import GenerateConfig, read_cots, resolve_sampling, sample_seed, special_ids
from rac.data.io import atomic_write_table, read_table_meta
from rac.data.prompts import PROMPTS_META_KEY
from rac.data.segments import CALIB_META_KEY, CALIB_SCHEMA, SEGMENT_IDS
from rac.data.templates import load_tokenizer
from rac.store.artifacts import sha256_file, sha256_tree

GENERIC_FILES = {"gensim/test/test_data/lee_background.cor": "utf-8", "gensim/test/test_data/lee.cor": "cp1252"}
P, D, OTHER = SEGMENT_IDS["prompt"], SEGMENT_IDS["decode"], SEGMENT_IDS["other"]


class DecodeShareError(ValueError):
    """A RAC calibration set has too few decode tokens."""


class ProgressiveConfig(StageConfig):
    """Progressive on-policy RAC (`rac.runs.progressive`): the sparsities of the intermediate models whose own
    CoTs calibrate the next step; the final sparsity is the prune entry's. Steps are unstructured fractions
    in (0, 1), strictly increasing (each prune entry checks that they stay below its sparsity)."""

    steps: tuple[float, ...] = Field(min_length=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _fractions(cls, v: Any) -> Any:
        if not isinstance(v, list | tuple):
            raise ValueError(f"expected a list of sparsities, e.g. [0.3, 0.5], got {v!r}")
        for s in v:
            if isinstance(s, bool) or not isinstance(s, int | float):
                raise ValueError(f"step {s!r} is not a sparsity fraction: intermediate steps are unstructured "
                                 "(an N:M pattern only as the final prune entry)")
            if not 0.0 < float(s) < 1.0:
                raise ValueError(f"step {s!r} is not in (0, 1)")
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"steps {list(v)} must increase strictly")
        return v

    def refuses(self, method: str, sparsity: float | None) -> str | None:
        """Why this chain cannot lead to a prune entry of `method` at `sparsity` (None: it can)."""
        if method == "gptq" or not sparsity:
            return (f"method {method!r} with sparsity {sparsity} prunes nothing, so there is no sparsity to step "
                    "towards (for joint sparse + quantized use sparsegpt with a sparsity and quant)")
        if method == "magnitude":
            return "magnitude pruning reads no calibration data, so on-policy steps cannot change it"
        above = [s for s in self.steps if s >= sparsity]
        if above:
            return f"step {above[0]} is not below the final sparsity {sparsity:g}"
        return None


class CalibConfig(StageConfig):
    """Which calibration set to build and its token budget (`progressive`: rac only, see ProgressiveConfig;
    left out of the canonical dict while unset, so every other calibration's hash is unchanged)."""

    kind: Literal["generic", "prompt", "rac", "self"] = "rac"
    token_budget: int = Field(default=1_000_000, ge=1)
    max_seq_len: int = Field(default=2048, ge=2)
    seed: int = 0
    min_decode_share: float = Field(default=0.5, ge=0.0, le=1.0)
    self_generation: GenerateConfig = GenerateConfig(max_new_tokens=512, shard_size=8)
    progressive: ProgressiveConfig | None = Field(default=None, exclude_if=lambda v: v is None)

    @field_validator("progressive")
    @classmethod
    def _rac_only(cls, v: ProgressiveConfig | None, info: ValidationInfo) -> ProgressiveConfig | None:
        kind = info.data.get("kind")
        if v is not None and kind != "rac":
            raise ValueError(f"progressive needs kind 'rac' (each step regenerates the CoTs of the prompts), "
                             f"got kind {kind!r}")
        return v

    def one_shot(self) -> CalibConfig:
        """This config without `progressive`: the set built from the dense model's CoTs (same hash as a plain
        `rac` calibration with the same settings), and the set each chain step builds from its CoTs."""
        return self.model_copy(update={"progressive": None})


@dataclass(frozen=True)
class CalibSummary:
    """What build_calibration wrote."""

    path: Path
    kind: str
    n_seqs: int
    n_tokens: int
    decode_share: float
    prompt_share: float
    other_share: float
    exhausted: bool
    skipped: int


Seq = tuple[str, list[int], list[int]]  # (source, input_ids, segment)


def generic_texts() -> list[str]:
    """The Lee corpus articles shipped in the gensim wheel (one article per line)."""
    dist = distribution("gensim")
    texts: list[str] = []
    for rel, encoding in GENERIC_FILES.items():
        path = Path(str(dist.locate_file(rel)))
        texts += [line.strip() for line in path.read_text(encoding=encoding).splitlines() if line.strip()]
    return texts


def _pack(seqs: list[Seq], budget: int, min_keep: list[int]) -> tuple[list[Seq], bool]:
    """Take sequences until `budget` tokens; the last is cut to fit if it keeps >= min_keep[i] tokens."""
    out: list[Seq] = []
    used = 0
    for (src, ids, seg), keep in zip(seqs, min_keep, strict=True):
        room = budget - used
        if room <= 0:
            return out, False
        if len(ids) > room:
            if room >= keep:
                out.append((src, ids[:room], seg[:room]))
            return out, False
        out.append((src, ids, seg))
        used += len(ids)
    return out, used < budget


def _generic(cfg: CalibConfig, tok: Any, eos: int) -> list[Seq]:
    texts = generic_texts()
    random.Random(cfg.seed).shuffle(texts)
    stream: list[int] = []
    for t in texts:
        stream += list(tok(t, add_special_tokens=False)["input_ids"]) + [eos]
    L = cfg.max_seq_len
    return [(f"generic:lee/{i // L}", stream[i: i + L], [OTHER] * len(stream[i: i + L]))
            for i in range(0, len(stream), L)]


def _prompt_seqs(prompts_path: Path, cfg: CalibConfig) -> list[Seq]:
    t = pq.read_table(prompts_path, columns=["prompt_id", "input_ids"])
    seqs = [(f"prompt:{pid}", ids[: cfg.max_seq_len], [P] * min(len(ids), cfg.max_seq_len))
            for pid, ids in zip(t.column("prompt_id").to_pylist(), t.column("input_ids").to_pylist(), strict=True)]
    random.Random(cfg.seed).shuffle(seqs)
    return seqs


def _rac_seqs(cots_dir: Path, cfg: CalibConfig) -> tuple[list[Seq], list[int], int]:
    """(prompt + CoT sequences, min tokens to keep each, number skipped for an over-long prompt)."""
    t = read_cots(cots_dir)
    rows = list(zip(t.column("cot_id").to_pylist(), t.column("prompt_ids").to_pylist(),
                    t.column("completion_ids").to_pylist(), strict=True))
    random.Random(cfg.seed).shuffle(rows)
    seqs, keep, skipped = [], [], 0
    for cid, p, c in rows:
        if len(p) >= cfg.max_seq_len or not c:
            skipped += 1
            continue
        ids = (p + c)[: cfg.max_seq_len]
        seqs.append((f"cot:{cid}", ids, ([P] * len(p) + [D] * len(c))[: cfg.max_seq_len]))
        keep.append(len(p) + 1)
    return seqs, keep, skipped


def _self_seqs(cfg: CalibConfig, model_dir: Path, tok: Any) -> list[Seq]:
    """Unconditional samples from the start token until the budget is covered."""
    g = cfg.self_generation
    eos, pad = special_ids(model_dir)
    start = tok.bos_token_id if tok.bos_token_id is not None else eos[0]
    cap = min(g.max_new_tokens, cfg.max_seq_len - 1)
    spec = resolve_sampling(g, model_dir, cap)
    n = -(-cfg.token_budget // (cap + 1))  # enough samples if none stops early; topped up below
    engine = make_engine(g.engine, model_dir, eos_ids=eos, pad_id=pad, dtype=g.dtype, batch_size=g.batch_size,
                         max_model_len=cfg.max_seq_len, kv_cache_gib=g.kv_cache_gib, seed=g.seed)
    seqs: list[Seq] = []
    try:
        done, i = 0, 0
        while done < cfg.token_budget:
            reqs = [Request([start], sample_seed(cfg.seed, "self", i + j), cap) for j in range(n)]
            for j, c in enumerate(engine.generate(reqs, spec)):
                ids = [start] + c.token_ids
                seqs.append((f"self:{i + j}", ids, [OTHER] + [D] * len(c.token_ids)))
                done += len(ids)
            i += n
            n = max(1, -(-(cfg.token_budget - done) // (cap + 1)))
    finally:
        engine.close()
    return seqs


def _shares(seqs: list[Seq]) -> dict[str, float]:
    total = sum(len(s) for _, _, s in seqs) or 1
    return {f"{name}_share": sum(seg.count(i) for _, _, seg in seqs) / total for name, i in SEGMENT_IDS.items()}


def build_calibration(cfg: CalibConfig, model_dir: Path, out_path: Path, prompts_path: Path | None = None,
                      cots_dir: Path | None = None) -> CalibSummary:
    """Write the `cfg.kind` calibration set for `model_dir`'s tokenizer to `out_path`.

    A progressive config is refused: its sets depend on the prune target (`rac.runs.progressive` builds
    them, each with `cfg.one_shot()`)."""
    if cfg.progressive is not None:
        raise ValueError("a progressive calibration is built per prune target by rac.runs.progressive; "
                         "build_calibration takes its one_shot() config")
    tok = load_tokenizer(str(model_dir))
    meta: dict[str, Any] = {"kind": cfg.kind, "tokenizer": str(getattr(tok, "name_or_path", "")),
                            "config_hash": cfg.stable_hash(), "config": cfg.canonical()}
    skipped = 0
    if cfg.kind in ("prompt", "rac"):
        need, have = ("prompts_path", prompts_path) if cfg.kind == "prompt" else ("cots_dir", cots_dir)
        if have is None:
            raise ValueError(f"calibration kind {cfg.kind!r} needs {need}")
    if cfg.kind == "generic":
        seqs, keep = _generic(cfg, tok, special_ids(model_dir)[0][0]), None
        meta["source"] = {"package": f"gensim=={distribution('gensim').version}", "files": list(GENERIC_FILES)}
    elif cfg.kind == "prompt":
        assert prompts_path is not None
        seqs, keep = _prompt_seqs(prompts_path, cfg), None
        meta["template"] = read_table_meta(prompts_path, PROMPTS_META_KEY).get("template")
        meta["source"] = {"prompts_sha256": sha256_file(prompts_path)}  # content, not where it lies
    elif cfg.kind == "rac":
        assert cots_dir is not None
        seqs, keep_l, skipped = _rac_seqs(cots_dir, cfg)
        keep = keep_l
        meta["template"] = read_table_meta(sorted(Path(cots_dir).glob("part-*.parquet"))[0],
                                           b"rac.cots").get("template")
        meta["source"] = {"cots_sha256": sha256_tree(cots_dir, ("*part-*.parquet",))[0]}
    else:
        seqs, keep = _self_seqs(cfg, model_dir, tok), None
        meta["source"] = {"model": str(model_dir), "start": "bos"}
    packed, exhausted = _pack(seqs, cfg.token_budget, keep or [1] * len(seqs))
    if not packed:
        raise ValueError(f"calibration kind {cfg.kind!r} produced no sequences (skipped {skipped})")
    shares = _shares(packed)
    n_tokens = sum(len(ids) for _, ids, _ in packed)
    meta.update(n_tokens=n_tokens, n_seqs=len(packed), exhausted=exhausted, skipped=skipped, **shares)
    if cfg.kind == "rac" and shares["decode_share"] < cfg.min_decode_share:
        raise DecodeShareError(
            f"RAC calibration decode share {shares['decode_share']:.3f} < min_decode_share "
            f"{cfg.min_decode_share} ({n_tokens} tokens); longer CoTs or a lower minimum are needed"
        )
    table = pa.table(
        {"seq_id": list(range(len(packed))), "source": [s for s, _, _ in packed],
         "input_ids": [ids for _, ids, _ in packed], "segment": [seg for _, _, seg in packed]},
        schema=CALIB_SCHEMA,
    )
    atomic_write_table(table.replace_schema_metadata({CALIB_META_KEY: json.dumps(meta)}), out_path)
    return CalibSummary(path=out_path, kind=cfg.kind, n_seqs=len(packed), n_tokens=n_tokens,
                        decode_share=shares["decode_share"], prompt_share=shares["prompt_share"],
                        other_share=shares["other_share"], exhausted=exhausted, skipped=skipped)


def read_calibration_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a calibration set."""
    return read_table_meta(path, CALIB_META_KEY)
