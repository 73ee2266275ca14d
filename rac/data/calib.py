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
`decode_share` (`rac` only) replaces this packing by an exact mix of whole CoTs and prompt-only sequences at the
same budget (the rule: `_mix`; docs/decode-share.md).
The schema metadata JSON (CALIB_META_KEY) records kind, tokenizer, n_tokens, segment shares, the template and
the source files. A `rac` set whose decode share is below `min_decode_share` raises DecodeShareError.
`progressive` (ProgressiveConfig, `rac` only) asks for progressive on-policy RAC: the run regenerates the CoTs
with partly pruned models between sparsity steps (rac.runs.progressive, docs/progressive.md); each of its sets
is an ordinary `rac` set built here with `one_shot()`.
"""

from __future__ import annotations

import json
import math
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
# the segments the tokens of each kind carry (a weighting must give one of them a weight > 0)
KIND_SEGMENTS: dict[str, tuple[str, ...]] = {"generic": ("other",), "prompt": ("prompt",), "rac": ("prompt", "decode"),
                                             "self": ("other", "decode")}


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
    # rac only: the set's exact share of decode tokens at token_budget (`_mix`); left out of canonical() unset
    decode_share: float | None = Field(default=None, gt=0.0, lt=1.0, exclude_if=lambda v: v is None)
    self_generation: GenerateConfig = GenerateConfig(max_new_tokens=512, shard_size=8)
    progressive: ProgressiveConfig | None = Field(default=None, exclude_if=lambda v: v is None)

    @field_validator("decode_share")
    @classmethod
    def _mix_rac_only(cls, v: float | None, info: ValidationInfo) -> float | None:
        kind, floor = info.data.get("kind"), info.data.get("min_decode_share")
        if v is not None and kind != "rac":
            raise ValueError(f"decode_share mixes CoTs and prompts, so it needs kind 'rac', got kind {kind!r}")
        if v is not None and floor is not None and floor > v:
            raise ValueError(f"decode_share = {v} is below min_decode_share = {floor}: set min_decode_share to at "
                             f"most {v}")
        return v

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


def _prompt_rows(prompts_path: Path, cfg: CalibConfig) -> list[tuple[str, Seq]]:
    """(prompt id, prompt-only sequence cut to max_seq_len) of every prompt, in the seeded order."""
    t = pq.read_table(prompts_path, columns=["prompt_id", "input_ids"])
    rows = [(str(pid), (f"prompt:{pid}", ids[: cfg.max_seq_len], [P] * min(len(ids), cfg.max_seq_len)))
            for pid, ids in zip(t.column("prompt_id").to_pylist(), t.column("input_ids").to_pylist(), strict=True)]
    random.Random(cfg.seed).shuffle(rows)
    return rows


def _rac_seqs(cots_dir: Path, cfg: CalibConfig) -> tuple[list[Seq], list[int], int, list[str]]:
    """(prompt + CoT sequences, min tokens to keep each, number skipped for an over-long prompt, the prompt id
    of each sequence)."""
    t = read_cots(cots_dir)
    rows = list(zip(t.column("cot_id").to_pylist(), t.column("prompt_ids").to_pylist(),
                    t.column("completion_ids").to_pylist(), t.column("prompt_id").to_pylist(), strict=True))
    random.Random(cfg.seed).shuffle(rows)
    seqs, keep, pids, skipped = [], [], [], 0
    for cid, p, c, pid in rows:
        if len(p) >= cfg.max_seq_len or not c:
            skipped += 1
            continue
        ids = (p + c)[: cfg.max_seq_len]
        seqs.append((f"cot:{cid}", ids, ([P] * len(p) + [D] * len(c))[: cfg.max_seq_len]))
        keep.append(len(p) + 1)
        pids.append(str(pid))
    return seqs, keep, skipped, pids


def _mix(cots: list[Seq], cot_pids: list[str], prompts: list[tuple[str, Seq]], cfg: CalibConfig) -> list[Seq]:
    """The `decode_share` set: exactly B = token_budget tokens, of which D = floor(decode_share x B + 1/2) are
    decode tokens (so the achieved share is within 1/(2B) of the target).

    1. CoT part: the `rac` sequences (prompt + CoT, the seeded order and max_seq_len cut of a plain `rac` set) are
       taken whole while their CoT tokens total less than D; the one that reaches D keeps its whole prompt and
       its first CoT tokens up to D exactly. A CoT is never separated from its prompt, nor cut but at its end.
    2. Prompt part: the B - D prompt tokens are the CoT part's prompts plus prompt-only sequences: the prompts
       (the `prompt` kind's seeded order and max_seq_len cut) whose id has no CoT in the CoT part, taken whole,
       the last one cut to land on B - D exactly.
    So the CoTs are a subsample of the full `rac` set's (whole ones but the last), the rest of the budget goes to
    more prompts, and a lower share means fewer CoTs, not shorter ones. DecodeShareError when the CoTs hold fewer
    than D tokens, when the CoT part's prompts alone exceed B - D (the share is above what whole prompts allow),
    or when the prompts run out before B - D.
    """
    budget, share = cfg.token_budget, float(cfg.decode_share or 0.0)
    n_decode = math.floor(share * budget + 0.5)
    n_prompt, what = budget - n_decode, f"decode_share = {share} of token_budget = {budget}"
    out: list[Seq] = []
    got, used = 0, set()
    for (src, ids, seg), pid in zip(cots, cot_pids, strict=True):
        if got >= n_decode:
            break
        p = seg.count(P)  # the whole prompt comes first (over-long prompts were skipped)
        take = min(len(ids) - p, n_decode - got)
        out.append((src, ids[: p + take], seg[: p + take]))
        got += take
        used.add(pid)
    if got < n_decode:
        raise DecodeShareError(f"{what} needs {n_decode} decode tokens but the {len(cots)} CoTs hold {got} (cut to "
                               f"max_seq_len = {cfg.max_seq_len}); generate more CoTs or lower decode_share")
    have = sum(seg.count(P) for _, _, seg in out)
    if have > n_prompt:
        raise DecodeShareError(f"{what}: the {len(out)} CoTs that give its {n_decode} decode tokens come with {have} "
                               f"prompt tokens, more than the {n_prompt} it leaves (prompts are kept whole); these "
                               f"CoTs reach at most {n_decode / (n_decode + have):.3f}: lower decode_share")
    for pid, (src, ids, seg) in prompts:
        if have >= n_prompt:
            break
        if pid not in used:
            room = n_prompt - have
            out.append((src, ids[:room], seg[:room]))
            have += min(len(ids), room)
    if have < n_prompt:
        raise DecodeShareError(f"{what} needs {n_prompt} prompt tokens but the CoTs' prompts and the other "
                               f"{len([q for q in prompts if q[0] not in used])} prompts hold {have}; use more "
                               "prompts (prompts.n), a lower token_budget or a higher decode_share")
    return out


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


def _packed(cfg: CalibConfig, model_dir: Path, tok: Any, prompts_path: Path | None, cots_dir: Path | None,
            meta: dict[str, Any]) -> tuple[list[Seq], bool, int]:
    """(the set's sequences, exhausted, skipped) of `cfg.kind`; its template and sources added to `meta`."""
    if cfg.kind in ("prompt", "rac"):
        need, have = ("prompts_path", prompts_path) if cfg.kind == "prompt" else ("cots_dir", cots_dir)
        if have is None:
            raise ValueError(f"calibration kind {cfg.kind!r} needs {need}")
    if cfg.kind == "generic":
        meta["source"] = {"package": f"gensim=={distribution('gensim').version}", "files": list(GENERIC_FILES)}
        seqs = _generic(cfg, tok, special_ids(model_dir)[0][0])
        return (*_pack(seqs, cfg.token_budget, [1] * len(seqs)), 0)
    if cfg.kind == "prompt":
        assert prompts_path is not None
        meta["template"] = read_table_meta(prompts_path, PROMPTS_META_KEY).get("template")
        meta["source"] = {"prompts_sha256": sha256_file(prompts_path)}  # content, not where it lies
        seqs = [seq for _, seq in _prompt_rows(prompts_path, cfg)]
        return (*_pack(seqs, cfg.token_budget, [1] * len(seqs)), 0)
    if cfg.kind == "self":
        meta["source"] = {"model": str(model_dir), "start": "bos"}
        seqs = _self_seqs(cfg, model_dir, tok)
        return (*_pack(seqs, cfg.token_budget, [1] * len(seqs)), 0)
    assert cots_dir is not None
    seqs, keep, skipped, pids = _rac_seqs(cots_dir, cfg)
    meta["template"] = read_table_meta(sorted(Path(cots_dir).glob("part-*.parquet"))[0], b"rac.cots").get("template")
    meta["source"] = {"cots_sha256": sha256_tree(cots_dir, ("*part-*.parquet",))[0]}
    if cfg.decode_share is None:
        return (*_pack(seqs, cfg.token_budget, keep), skipped)
    if prompts_path is None:
        raise ValueError("a rac calibration with decode_share needs prompts_path (its prompt-only sequences)")
    meta["source"]["prompts_sha256"] = sha256_file(prompts_path)
    return _mix(seqs, pids, _prompt_rows(prompts_path, cfg), cfg), False, skipped


def build_calibration(cfg: CalibConfig, model_dir: Path, out_path: Path, prompts_path: Path | None = None,
                      cots_dir: Path | None = None) -> CalibSummary:
    """Write the `cfg.kind` calibration set for `model_dir`'s tokenizer to `out_path` (kind rac: from `cots_dir`,
    and with `decode_share` also from `prompts_path`).

    A progressive config is refused: its sets depend on the prune target (`rac.runs.progressive` builds
    them, each with `cfg.one_shot()`)."""
    if cfg.progressive is not None:
        raise ValueError("a progressive calibration is built per prune target by rac.runs.progressive; "
                         "build_calibration takes its one_shot() config")
    tok = load_tokenizer(str(model_dir))
    meta: dict[str, Any] = {"kind": cfg.kind, "tokenizer": str(getattr(tok, "name_or_path", "")),
                            "config_hash": cfg.stable_hash(), "config": cfg.canonical()}
    packed, exhausted, skipped = _packed(cfg, model_dir, tok, prompts_path, cots_dir, meta)
    if not packed:
        raise ValueError(f"calibration kind {cfg.kind!r} produced no sequences (skipped {skipped})")
    shares = _shares(packed)
    n_tokens = sum(len(ids) for _, ids, _ in packed)
    meta.update(n_tokens=n_tokens, n_seqs=len(packed), exhausted=exhausted, skipped=skipped, **shares)
    # with decode_share the share is exact by construction (and min_decode_share <= decode_share, checked)
    if cfg.kind == "rac" and cfg.decode_share is None and shares["decode_share"] < cfg.min_decode_share:
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
