"""The concrete stages of a run, each a memoised `run_stage` over one library entry point.

prompts  -> rac.data.sample_prompts        stages/prompts/<key>/prompts.parquet
cots     -> rac.data.generate_cots         stages/cots/<key>/part-NNNNN.parquet   (shard-wise resume)
calib    -> rac.data.build_calibration     stages/calib/<key>/calib.parquet
prune    -> rac.engine.compress            stages/prune/<key>/model/ (+ work/ while running; step resume)
eval     -> rac.eval.evaluate              stages/eval/<key>/rows.parquet + summary.json
tokerror -> rac.eval.token_error_heatmap   stages/tokerror/<key>/heatmap.png + summary.json
proxies  -> rac.eval.cot_proxies           stages/proxies/<key>/summary.json

Library modules are imported inside the functions: this module is the seam between the pipeline and
the stage implementations.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rac.artifacts import ArtifactRef, atomic_write_json
from rac.config import StageConfig
from rac.index import Index
from rac.pipeline import ProgressFn, RunEnv, StageOutput, run_stage, stage_key
from rac.resume import CotsResume, PruneResume
from rac.runconfig import PruneJob, ReportConfig

LogFn = Callable[[str], None]


def _noop(done: int, total: int, what: str) -> None:
    return None


def to_jsonable(obj: Any) -> Any:
    """A library summary (dataclass / pydantic / mapping) as plain JSON data; NaN/inf become None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    elif hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


# ------------------------------------------------------------------ keys (also used by Prefect cache_key_fn)
def prompts_key(env: RunEnv, cfg: Any) -> str:
    return stage_key("prompts", cfg.canonical(), [], env)


def cots_key(env: RunEnv, cfg: Any, prompts: StageOutput) -> str:
    return stage_key("cots", cfg.canonical(), list(prompts.outputs), env)


def calib_key(env: RunEnv, cfg: Any, inputs: list[StageOutput]) -> str:
    return stage_key("calib", cfg.canonical(), [r for s in inputs for r in s.outputs], env)


def prune_key(env: RunEnv, job: PruneJob, calib: StageOutput) -> str:
    return stage_key("prune", job.compress.canonical(), list(calib.outputs), env)


def eval_key(env: RunEnv, cfg: Any, model: StageOutput | None, prompts: StageOutput) -> str:
    return stage_key("eval", cfg.canonical(), [*(model.outputs if model else ()), *prompts.outputs], env)


# ------------------------------------------------------------------ stages
def prompts_step(env: RunEnv, cfg: Any, log: LogFn = print, name: str = "prompts") -> StageOutput:
    """Sample prompts (calibration, or `name="prompts/eval"` for the eval set; deterministic by seed)."""
    from rac.data.prompts import sample_prompts

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        out = folder / "prompts.parquet"
        summary = sample_prompts(cfg, Path(env.model_dir), out)
        return [ArtifactRef.of(out, "prompts")], to_jsonable(summary)

    return run_stage(env, name, "prompts", cfg.canonical(), [], compute, log)


def cots_step(env: RunEnv, cfg: Any, prompts: StageOutput, progress: ProgressFn = _noop,
              log: LogFn = print, run_shards: Any = None, wave: int = 1) -> StageOutput:
    """Generate the on-policy CoTs shard by shard; a crash resumes at the first unverified shard.

    `run_shards` / `wave`: hand missing shards to workers `wave` at a time (see `generate_cots`); the
    stage key and its artifact do not depend on them."""
    from rac.data.generate import generate_cots

    key = cots_key(env, cfg, prompts)

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        resume = CotsResume(Index(env.work_dir), env, key, folder, log)
        resume.prepare()
        n_prompts = pq.read_metadata(str(prompts.output("prompts").path)).num_rows
        total = -(-n_prompts // cfg.shard_size)
        summary = generate_cots(prompts.output("prompts").path, Path(env.model_dir), cfg, folder,
                                on_shard=resume.on_shard(progress, total), run_shards=run_shards, wave=wave)
        return [resume.final_ref()], to_jsonable(summary)

    return run_stage(env, "cots", "cots", cfg.canonical(), list(prompts.outputs), compute, log)


def calib_step(env: RunEnv, name: str, cfg: Any, prompts: StageOutput | None, cots: StageOutput | None,
               log: LogFn = print) -> StageOutput:
    """Build one calibration set (generic / prompt / rac / self)."""
    from rac.data.calib import build_calibration

    inputs = [s for s in (prompts, cots) if s is not None]

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        out = folder / "calib.parquet"
        summary = build_calibration(
            cfg, Path(env.model_dir), out,
            prompts.output("prompts").path if prompts else None,
            cots.output("cots").path if cots else None,
        )
        return [ArtifactRef.of(out, "calibration")], to_jsonable(summary)

    refs = [r for s in inputs for r in s.outputs]
    return run_stage(env, f"calib/{name}", "calib", cfg.canonical(), refs, compute, log)


def prune_step(env: RunEnv, job: PruneJob, calib: StageOutput, progress: ProgressFn = _noop,
               log: LogFn = print, provenance: dict[str, StageConfig] | None = None) -> StageOutput:
    """Prune the dense model on one calibration set, continuing from the last verified (layer, group).

    `provenance`: other stage configs (prompts, generation, calibration) recorded in the output's
    rac_provenance.json; they are already part of the key through the calibration's hash.
    """
    from rac.engine import compress
    from rac.models.streaming import load_config

    key = prune_key(env, job, calib)
    config, adapter = load_config(Path(env.model_dir), job.compress.trust_remote_code)
    resume = PruneResume(Index(env.work_dir), env, key, env.stage_dir("prune", key), log,
                         int(config.num_hidden_layers), len(adapter.groups))

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        start_at = resume.plan()
        result = compress(Path(env.model_dir), calib.output("calibration").path, resume.out_dir, job.compress,
                          resume.work_dir, start_at=start_at, on_step=resume.on_step(progress),
                          stage_configs=provenance or {})
        summary = {"label": job.label, "calibration": job.calibration, "method": job.compress.prune.method,
                   "sparsity": job.compress.prune.sparsity, "start_at": start_at,
                   "n_tokens": result.n_tokens, "seconds": result.seconds, "steps_computed": len(result.steps)}
        return [ArtifactRef.of(resume.out_dir, "model")], summary

    return run_stage(env, f"prune/{job.label}", "prune", job.compress.canonical(), list(calib.outputs),
                     compute, log, cleanup=resume.cleanup)


def eval_step(env: RunEnv, label: str, cfg: Any, model: StageOutput | None, prompts: StageOutput,
              meta: dict[str, Any], log: LogFn = print, progress: ProgressFn = _noop) -> StageOutput:
    """Evaluate the dense model (model=None) or a pruned one on the eval prompts; write the `evals` row.

    An interrupted evaluation keeps its generation shards that the index recorded and still verify, and
    generates only the rest (like the CoT stage).
    """
    from rac.eval.evaluate import eval_cots_dir, evaluate

    key = eval_key(env, cfg, model, prompts)

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        model_dir = model.output("model").path if model else Path(env.model_dir)
        rows = folder / "rows.parquet"
        resume = CotsResume(Index(env.work_dir), env, key, eval_cots_dir(rows), log)
        kept = resume.prepare()
        if kept:
            log(f"[eval/{label}] resuming after {kept} verified generation shard(s)")
        n_prompts = pq.read_metadata(str(prompts.output("prompts").path)).num_rows
        total = -(-n_prompts * cfg.generation.samples_per_prompt // cfg.generation.shard_size)
        summary = to_jsonable(evaluate(model_dir, cfg, rows, on_shard=resume.on_shard(progress, total)))
        return [ArtifactRef.of(rows, "eval-rows"), ArtifactRef.of(rows.with_suffix(".json"), "eval-summary")], summary

    refs = [*(model.outputs if model else ()), *prompts.outputs]
    out = run_stage(env, f"eval/{label}", "eval", cfg.canonical(), refs, compute, log)
    Index(env.work_dir).record_eval(env.run_id, label, out.key, {**metrics_row(out.summary), **meta})
    return out


def metrics_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The `evals` table columns from an evaluation summary (tolerant to nesting and naming)."""
    flat: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            flat.update({f"{k}_{kk}": vv for kk, vv in v.items()})
        flat[k] = v
    names = {
        "n": ("n", "n_problems", "n_rows"), "accuracy": ("accuracy",),
        "ci_low": ("ci_low", "accuracy_ci_low", "accuracy_low"),
        "ci_high": ("ci_high", "accuracy_ci_high", "accuracy_high"),
        "mean_tokens": ("mean_tokens", "mean_cot_tokens"), "median_tokens": ("median_tokens", "median_cot_tokens"),
        "p90_tokens": ("p90_tokens", "p90_cot_tokens"), "runaway_share": ("runaway_share", "cap_rate", "runaway"),
        "wall_s": ("wall_s", "wall_time_s", "seconds"), "tokens_per_s": ("tokens_per_s", "tok_per_s"),
    }
    row: dict[str, Any] = {}
    for col, cands in names.items():
        row[col] = next((flat[c] for c in cands if c in flat and not isinstance(flat[c], dict | list)), None)
    ci = flat.get("accuracy_ci") or flat.get("ci")
    if isinstance(ci, list | tuple) and len(ci) == 2:
        row["ci_low"], row["ci_high"] = ci
    row["metrics"] = summary
    return row


def proxies_key(env: RunEnv, cfg: Any, pruned: StageOutput, dense_eval: StageOutput) -> str:
    return stage_key("proxies", cfg.canonical(), [*pruned.outputs, dense_eval.output("eval-rows")], env)


def proxies_step(env: RunEnv, label: str, cfg: Any, pruned: StageOutput, dense_eval: StageOutput,
                 tokerror: StageOutput | None, meta: dict[str, Any], log: LogFn = print) -> StageOutput:
    """NLL / top-1 agreement / KL of a pruned model on the dense model's held-out eval CoTs; writes the
    `proxies` row (with the reconstruction error by segment of `tokerror`, when there is one)."""
    from rac.eval.evaluate import eval_cots_dir
    from rac.eval.proxies import cot_proxies

    rows = dense_eval.output("eval-rows")
    cots = eval_cots_dir(rows.path)

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        n_rows = pq.read_metadata(str(rows.path)).num_rows
        res = cot_proxies(Path(env.model_dir), pruned.output("model").path, cots, cfg)
        if res.n_sequences > n_rows:
            raise ValueError(f"{cots} holds more CoTs ({res.n_sequences}) than the dense eval rows ({n_rows})")
        summary = to_jsonable(res.as_dict())
        atomic_write_json(folder / "summary.json", summary)
        return [ArtifactRef.of(folder / "summary.json", "proxies-summary")], summary

    out = run_stage(env, f"proxies/{label}", "proxies", cfg.canonical(), [*pruned.outputs, rows], compute, log)
    recon = tokerror.summary if tokerror is not None else {}
    Index(env.work_dir).record_proxies(env.run_id, label, out.key, {**out.summary, **meta}, recon)
    return out


def tokerror_step(env: RunEnv, label: str, cfg: ReportConfig, pruned: StageOutput, calib: StageOutput,
                  log: LogFn = print) -> StageOutput:
    """Per-token reconstruction-error heatmap of one pruned model on a few of its calibration sequences."""
    from rac.eval.tokerror import token_error_heatmap

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        png = folder / "heatmap.png"
        res = token_error_heatmap(Path(env.model_dir), pruned.output("model").path,
                                  calib.output("calibration").path, png,
                                  n_seqs=cfg.heatmap_sequences, max_tokens=cfg.heatmap_max_tokens, title=label)
        summary = to_jsonable(res)
        atomic_write_json(folder / "summary.json", summary)
        return [ArtifactRef.of(png, "tokerror-png"), ArtifactRef.of(folder / "summary.json", "tokerror-summary")], summary

    inputs = [*pruned.outputs, *calib.outputs]
    return run_stage(env, f"tokerror/{label}", "tokerror", cfg.canonical(), inputs, compute, log)


def dump(out: StageOutput) -> str:
    """One-line JSON of a stage output (logs, Prefect markdown)."""
    return json.dumps({"name": out.name, "key": out.key, "reused": out.reused,
                       "outputs": [r.uri for r in out.outputs]})
