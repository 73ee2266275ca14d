"""CoT stage: the dense model samples its own chains of thought for the prompts, shard by shard.

Layout of `out_dir` (the `cots/` folder):
  part-NNNNN.parquet  shard k = prompts [k*shard_size, (k+1)*shard_size) x samples_per_prompt, written to a
                      temp file and renamed, so a shard is either complete or absent.
Columns: cot_id, prompt_id, sample_index, seed, prompt_ids, completion_ids (the exact sampled ids, EOS kept),
text (= tokenizer.decode(completion_ids, skip_special_tokens=True)), finish_reason ("stop"/"length"),
prompt_len, completion_len; schema metadata b"rac.cots" = JSON {config_hash, engine, sampling, template, ...}.

Fan-out: `generate_cots(..., run_shards=, wave=)` hands missing shards to another runner (e.g. Prefect
tasks on Dask workers, each owning an engine; see tasks/generation.py); `plan_cots` + `write_shard` are what a
worker runs for one shard. Shards remain the unit of resume either way.

Resume: existing shards with the same config hash are kept, the first missing shard is generated next, and a
shard is never written twice. Each sample's seed is derived from (seed, prompt_id, sample_index), and a shard
always holds the same requests, so an interrupted-and-resumed run ends with the rows of an uninterrupted one.
Budget: before each shard the tokens (prompt + completion) already written are summed; once they reach
`token_budget` no further shard is started. The per-CoT cap is `max_new_tokens`, lowered per prompt so that
prompt + CoT fit the context window.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from rac.config import StageConfig
from rac.data.engines import ENGINES, Request, SamplingSpec, UnknownEngineError, make_engine
from rac.data.io import atomic_write_table, read_table_meta
from rac.data.prompts import PROMPTS_META_KEY, PromptTooLongError
from rac.data.templates import context_window, load_tokenizer
from rac.store.artifacts import sweep_temp

COTS_META_KEY = b"rac.cots"
FALLBACK_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.0}  # R1 advice
COTS_SCHEMA = pa.schema(
    [
        pa.field("cot_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("prompt_len", pa.int32(), nullable=False),
        pa.field("completion_len", pa.int32(), nullable=False),
    ]
)


class GenerateConfig(StageConfig):
    """Engine, sampling (None: the model's generation_config.json, else R1 defaults), budgets, sharding."""

    engine: str = "transformers"
    samples_per_prompt: int = Field(default=1, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    max_new_tokens: int = Field(default=8192, ge=1)
    token_budget: int | None = Field(default=1_000_000, ge=1)
    shard_size: int = Field(default=32, ge=1)
    batch_size: int = Field(default=8, ge=1)
    dtype: str = "bfloat16"
    seed: int = 0
    kv_cache_gib: int = Field(default=1, ge=1)
    # vLLM only: GPUs per engine (tensor parallel) and engine replicas inside one vLLM instance; left out
    # of the canonical dict (and so of every hash, also when nested in another config) while they are 1
    tensor_parallel_size: int = Field(default=1, ge=1, exclude_if=lambda v: v == 1)
    data_parallel_size: int = Field(default=1, ge=1, exclude_if=lambda v: v == 1)

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v not in ENGINES:
            raise UnknownEngineError(f"unknown engine {v!r}; known engines: {list(ENGINES)}")
        return v


@dataclass(frozen=True)
class GenerateSummary:
    """What generate_cots did: shards written now vs found, token counts, budget, speed."""

    out_dir: Path
    n_shards: int
    shards_written: int
    shards_reused: int
    n_rows: int
    prompt_tokens: int
    completion_tokens: int
    n_length_capped: int
    budget_reached: bool
    engine: str
    sampling: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    new_tokens_per_s: float = 0.0


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """Deterministic 63-bit seed of one (run seed, prompt, sample index)."""
    h = hashlib.sha256(f"{seed}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def special_ids(model_dir: Path) -> tuple[list[int], int]:
    """EOS ids (generation_config.json, else the tokenizer's) and the pad id."""
    gpath = Path(model_dir) / "generation_config.json"
    gen = json.loads(gpath.read_text()) if gpath.exists() else {}
    tok = load_tokenizer(str(model_dir))
    eos = gen.get("eos_token_id", tok.eos_token_id)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    if not eos_ids:
        raise ValueError(f"model {model_dir} defines no eos_token_id")
    pad = gen.get("pad_token_id", tok.pad_token_id)
    return eos_ids, int(pad if pad is not None else eos_ids[0])


def resolve_sampling(cfg: GenerateConfig, model_dir: Path, max_new_tokens: int | None = None) -> SamplingSpec:
    """Config values, else the model's generation_config.json, else FALLBACK_SAMPLING."""
    gpath = Path(model_dir) / "generation_config.json"
    gen = json.loads(gpath.read_text()) if gpath.exists() else {}
    vals: dict[str, Any] = {}
    for key, fallback in FALLBACK_SAMPLING.items():
        mine = getattr(cfg, key)
        vals[key] = mine if mine is not None else gen.get(key, fallback)
    return SamplingSpec(temperature=float(vals["temperature"]), top_p=float(vals["top_p"]),
                        top_k=int(vals["top_k"] or 0), repetition_penalty=float(vals["repetition_penalty"]),
                        max_new_tokens=max_new_tokens or cfg.max_new_tokens)


def build_requests(prompts: pa.Table, cfg: GenerateConfig, ctx: int) -> list[tuple[str, int, Request]]:
    """(prompt_id, sample_index, Request) for every prompt x sample, in shard order."""
    out = []
    for pid, ids in zip(prompts.column("prompt_id").to_pylist(), prompts.column("input_ids").to_pylist(),
                        strict=True):
        room = ctx - len(ids)
        if room < 1:
            raise PromptTooLongError(f"prompt {pid!r} has {len(ids)} tokens, context window is {ctx}")
        for k in range(cfg.samples_per_prompt):
            out.append((pid, k, Request(list(ids), sample_seed(cfg.seed, pid, k), min(cfg.max_new_tokens, room))))
    return out


def shard_path(out_dir: Path, k: int) -> Path:
    return Path(out_dir) / f"part-{k:05d}.parquet"


def _check_shard(path: Path, config_hash: str) -> pa.Table:
    """A finished shard, provided it was written by the same config; else ValueError."""
    meta = read_table_meta(path, COTS_META_KEY)
    if meta.get("config_hash") != config_hash:
        raise ValueError(
            f"{path} was written by config {meta.get('config_hash')!r}, not {config_hash!r}; use a new out_dir"
        )
    return pq.read_table(path)


def _shard_table(items: list[tuple[str, int, Request]], comps: list[Any], tok: Any, meta: dict) -> pa.Table:
    rows: dict[str, list[Any]] = {f.name: [] for f in COTS_SCHEMA}
    for (pid, k, req), c in zip(items, comps, strict=True):
        for name, val in (("cot_id", f"{pid}/{k}"), ("prompt_id", pid), ("sample_index", k), ("seed", req.seed),
                          ("prompt_ids", req.prompt_ids), ("completion_ids", c.token_ids),
                          ("text", tok.decode(c.token_ids, skip_special_tokens=True)),
                          ("finish_reason", c.finish_reason), ("prompt_len", len(req.prompt_ids)),
                          ("completion_len", len(c.token_ids))):
            rows[name].append(val)
    table = pa.table(rows, schema=COTS_SCHEMA)
    return table.replace_schema_metadata({COTS_META_KEY: json.dumps(meta)})


@dataclass(frozen=True)
class CotsPlan:
    """Every shard's requests of one (prompts, model, config), the sampling and the shard metadata."""

    model_dir: Path
    out_dir: Path
    cfg: GenerateConfig
    spec: SamplingSpec
    shards: tuple[tuple[tuple[str, int, Request], ...], ...]
    meta: dict[str, Any]

    @property
    def config_hash(self) -> str:
        return str(self.meta["config_hash"])

    def path(self, k: int) -> Path:
        return shard_path(self.out_dir, k)


def plan_cots(prompts_path: Path, model_dir: Path, cfg: GenerateConfig, out_dir: Path) -> CotsPlan:
    """The shard plan of a CoT run (reads the prompts; loads no model)."""
    prompts = pq.read_table(prompts_path)
    if prompts.num_rows == 0:
        raise ValueError(f"prompts file {prompts_path} has no rows")
    pmeta = read_table_meta(prompts_path, PROMPTS_META_KEY)
    spec = resolve_sampling(cfg, model_dir)
    items = build_requests(prompts, cfg, context_window(model_dir))
    per_shard = cfg.shard_size * cfg.samples_per_prompt
    shards = tuple(tuple(items[i: i + per_shard]) for i in range(0, len(items), per_shard))
    meta = {"config_hash": cfg.stable_hash(), "config": cfg.canonical(), "engine": cfg.engine,
            "sampling": spec.__dict__, "model_dir": str(model_dir), "template": pmeta.get("template"),
            "prompts_config_hash": pmeta.get("config_hash")}
    return CotsPlan(Path(model_dir), Path(out_dir), cfg, spec, shards, meta)


def open_engine(cfg: GenerateConfig, model_dir: Path) -> Any:
    """The generation engine a config asks for (the caller closes it)."""
    eos, pad = special_ids(model_dir)
    return make_engine(cfg.engine, model_dir, eos_ids=eos, pad_id=pad, dtype=cfg.dtype,
                       batch_size=cfg.batch_size, max_model_len=context_window(model_dir),
                       kv_cache_gib=cfg.kv_cache_gib, seed=cfg.seed,
                       tensor_parallel_size=cfg.tensor_parallel_size, data_parallel_size=cfg.data_parallel_size)


def write_shard(plan: CotsPlan, k: int, engine: Any, tok: Any = None) -> Path:
    """Generate shard `k` with `engine` and write it atomically; a finished shard of the same config is
    kept as it is (generation is deterministic per request seed, so a re-run would write the same rows)."""
    if not 0 <= k < len(plan.shards):
        raise ValueError(f"shard {k} out of range: the plan has {len(plan.shards)} shards")
    path = plan.path(k)
    if path.exists():
        _check_shard(path, plan.config_hash)
        return path
    tok = tok if tok is not None else load_tokenizer(str(plan.model_dir))
    shard = plan.shards[k]
    comps = engine.generate([req for _, _, req in shard], plan.spec)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_table(_shard_table(list(shard), comps, tok, plan.meta), path)
    return path


# run_shards(plan, ks): make shard files ks of the plan exist (in any order, anywhere), return when done
ShardRunner = Callable[[CotsPlan, list[int]], None]


def generate_cots(
    prompts_path: Path, model_dir: Path, cfg: GenerateConfig, out_dir: Path,
    on_shard: Callable[[int, Path], None] | None = None,
    run_shards: ShardRunner | None = None, wave: int = 1,
) -> GenerateSummary:
    """Sample CoTs for every prompt into sharded Parquet under `out_dir`, resuming finished shards.

    By default shards are generated here, one after another, with one engine. `run_shards` hands the
    missing shards out `wave` at a time (e.g. to workers that each own an engine); the token budget is
    checked between waves, in shard order, and shards a wave wrote past the budget are deleted, so the
    result holds the shards an uninterrupted sequential run would. `on_shard(k, path)` is called in shard
    order for every newly written shard that is kept.
    """
    if wave < 1:
        raise ValueError(f"wave must be >= 1, got {wave}")
    t0 = time.perf_counter()
    plan = plan_cots(prompts_path, model_dir, cfg, out_dir)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    sweep_temp(plan.out_dir)  # shards a killed writer left half-written
    local = _LocalShards()
    runner = run_shards or local
    totals = {"rows": 0, "prompt": 0, "completion": 0, "length": 0, "new": 0}
    written = reused = 0
    budget_hit = False
    fresh: set[int] = set()
    k = 0
    try:
        while k < len(plan.shards):
            if cfg.token_budget is not None and totals["prompt"] + totals["completion"] >= cfg.token_budget:
                budget_hit = True
                break
            path = plan.path(k)
            if not path.exists():
                todo = [j for j in range(k, min(len(plan.shards), k + wave)) if not plan.path(j).exists()]
                runner(plan, todo)
                lost = [j for j in todo if not plan.path(j).exists()]
                if lost:
                    raise RuntimeError(f"shard runner returned without writing shard(s) {lost} in {plan.out_dir}")
                fresh.update(todo)
            table = _check_shard(path, plan.config_hash)
            if k in fresh:
                written += 1
                totals["new"] += sum(table.column("completion_len").to_pylist())
                if on_shard is not None:
                    on_shard(k, path)
            else:
                reused += 1
            totals["rows"] += table.num_rows
            totals["prompt"] += sum(table.column("prompt_len").to_pylist())
            totals["completion"] += sum(table.column("completion_len").to_pylist())
            totals["length"] += table.column("finish_reason").to_pylist().count("length")
            k += 1
        for j in sorted(fresh):  # written by a wave past the budget: not part of the result
            if j >= k:
                plan.path(j).unlink(missing_ok=True)
    finally:
        local.close()
    wall = time.perf_counter() - t0
    return GenerateSummary(
        out_dir=plan.out_dir, n_shards=written + reused, shards_written=written, shards_reused=reused,
        n_rows=totals["rows"], prompt_tokens=totals["prompt"], completion_tokens=totals["completion"],
        n_length_capped=totals["length"], budget_reached=budget_hit, engine=cfg.engine,
        sampling=plan.spec.__dict__, wall_s=wall, new_tokens_per_s=totals["new"] / wall if wall > 0 else 0.0,
    )


class _LocalShards:
    """The default shard runner: shards generated in this process by one lazily opened engine."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.tok: Any = None

    def __call__(self, plan: CotsPlan, ks: list[int]) -> None:
        if self.engine is None:
            self.tok = load_tokenizer(str(plan.model_dir))
            self.engine = open_engine(plan.cfg, plan.model_dir)
        for k in ks:
            write_shard(plan, k, self.engine, self.tok)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def read_cots(out_dir: Path) -> pa.Table:
    """All shards of a cots folder, in shard order; ValueError when there are none."""
    parts = sorted(Path(out_dir).glob("part-*.parquet"))
    if not parts:
        raise ValueError(f"no CoT shards (part-*.parquet) in {out_dir}")
    return pa.concat_tables([pq.read_table(p) for p in parts])
