"""The concrete stages of a run, each a memoised `run_stage` over one library entry point.

prompts  -> rac.data.sample_prompts        stages/prompts/<key>/prompts.parquet
cots     -> rac.data.generate_cots         stages/cots/<key>/part-NNNNN.parquet   (shard-wise resume)
calib    -> rac.data.build_calibration     stages/calib/<key>/calib.parquet
prune    -> rac.engine.compress            stages/prune/<key>/model/ (+ work/ while running; step resume)
prune-step -> the same, for the intermediate models of a progressive chain (rac.runs.progressive), whose
              CoTs are the cots stage with the model folder as an input: stages/prune-step/<key>/model/
eval     -> rac.eval.evaluate              stages/eval/<key>/rows.parquet + summary.json
tokerror -> rac.eval.token_error_heatmap   stages/tokerror/<key>/heatmap.png + summary.json
proxies  -> rac.eval.cot_proxies           stages/proxies/<key>/summary.json

Every step takes the run (`RunRef`), its typed stage config and the `StageOutput`s it depends on, and
returns its own `StageOutput` (artifact references, never tensors or models).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rac.config import StageConfig
from rac.data.calib import CalibConfig, build_calibration
from rac.data.generate import GenerateConfig, ShardRunner, generate_cots
from rac.data.prompts import PromptsConfig, sample_prompts
from rac.engine import compress
from rac.eval.evaluate import EvalConfig, eval_cots_dir, evaluate
from rac.eval.proxies import ProxyConfig, cot_proxies
from rac.eval.tokerror import token_error_heatmap
from rac.models.streaming import load_config
from rac.runs.memo import ProgressFn, StageOutput, run_stage, stage_key
from rac.runs.resume import CotsResume, PruneResume
from rac.runs.run_config import PruneJob, ReportConfig
from rac.runs.workdir import RunRef
from rac.store.artifacts import ArtifactRef, atomic_write_json
from rac.store.index import Index

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


# ------------------------------------------------------------------ keys of the resumable stages
def _cots_inputs(prompts: StageOutput, model: StageOutput | None) -> list[ArtifactRef]:
    return [*prompts.outputs, *(model.outputs if model is not None else ())]  # the dense model: by revision


def cots_key(env: RunRef, cfg: GenerateConfig, prompts: StageOutput, model: StageOutput | None = None) -> str:
    return stage_key("cots", cfg.canonical(), _cots_inputs(prompts, model), env)


def prune_key(env: RunRef, job: PruneJob, calib: StageOutput, stage: str = "prune") -> str:
    return stage_key(stage, job.compress.canonical(), list(calib.outputs), env)


def eval_config(cfg: EvalConfig, template_hash: str | None) -> dict[str, Any]:
    """What keys an evaluation: its settings and the calibration template hash its prompts must carry."""
    return {**cfg.canonical(), "expect_template_hash": template_hash}


def eval_key(env: RunRef, cfg: EvalConfig, template_hash: str | None, model: StageOutput | None,
             prompts: StageOutput) -> str:
    inputs = [*(model.outputs if model else ()), *prompts.outputs]
    return stage_key("eval", eval_config(cfg, template_hash), inputs, env)


# ------------------------------------------------------------------ stages
def prompts_step(env: RunRef, cfg: PromptsConfig, log: LogFn = print, name: str = "prompts") -> StageOutput:
    """Sample prompts (calibration, or `name="prompts/eval"` for the eval set; deterministic by seed)."""
    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        out = folder / "prompts.parquet"
        summary = sample_prompts(cfg, Path(env.model_dir), out)
        return [ArtifactRef.of(out, "prompts")], to_jsonable(summary)

    return run_stage(env, name, "prompts", cfg.canonical(), [], compute, log)


def cots_step(env: RunRef, cfg: GenerateConfig, prompts: StageOutput, progress: ProgressFn = _noop,
              log: LogFn = print, run_shards: ShardRunner | None = None, wave: int = 1,
              model: StageOutput | None = None, name: str = "cots") -> StageOutput:
    """Generate the on-policy CoTs shard by shard; a crash resumes at the first unverified shard.

    `run_shards` / `wave`: hand missing shards to workers `wave` at a time (see `generate_cots`); the
    stage key and its artifact do not depend on them. `model`: a pruned model's stage (its `model` folder
    generates, and is part of the key) instead of the dense model; `name`: the stage name (and the
    `<name>.shard:<k>` crash point)."""
    key = cots_key(env, cfg, prompts, model)
    model_dir = model.output("model").path if model is not None else Path(env.model_dir)

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        resume = CotsResume(Index(env.work_dir), env, key, folder, log, point=name)
        resume.prepare()
        n_prompts = pq.read_metadata(str(prompts.output("prompts").path)).num_rows
        total = -(-n_prompts // cfg.shard_size)
        summary = generate_cots(prompts.output("prompts").path, model_dir, cfg, folder,
                                on_shard=resume.on_shard(progress, total), run_shards=run_shards, wave=wave)
        return [resume.final_ref()], to_jsonable(summary)

    return run_stage(env, name, "cots", cfg.canonical(), _cots_inputs(prompts, model), compute, log)


def calib_step(env: RunRef, name: str, cfg: CalibConfig, prompts: StageOutput | None, cots: StageOutput | None,
               log: LogFn = print) -> StageOutput:
    """Build one calibration set (generic / prompt / rac / self); a progressive config is refused before
    anything is recorded (its sets are the chain's: `rac.runs.progressive`, each with `cfg.one_shot()`)."""
    if cfg.progressive is not None:
        raise ValueError(f"calibration {name!r} is progressive: build its one_shot() set here, the chain's sets "
                         "with rac.runs.progressive.run_chain")
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


def prune_step(env: RunRef, job: PruneJob, calib: StageOutput, progress: ProgressFn = _noop,
               log: LogFn = print, provenance: Mapping[str, StageConfig] | None = None,
               stage: str = "prune") -> StageOutput:
    """Prune the dense model on one calibration set, continuing from the last verified (layer, group).

    `provenance`: other stage configs (prompts, generation, calibration, a progressive chain) recorded in the
    output's rac_provenance.json and the stage summary; they are already part of the key through the
    calibration's hash. `stage`: "prune", or "prune-step" for a progressive chain's intermediate model.
    """
    key = prune_key(env, job, calib, stage)
    config, adapter = load_config(Path(env.model_dir), job.compress.trust_remote_code)
    resume = PruneResume(Index(env.work_dir), env, key, env.stage_dir(stage, key), log,
                         int(config.num_hidden_layers), len(adapter.groups))

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        start_at = resume.plan()
        result = compress(Path(env.model_dir), calib.output("calibration").path, resume.out_dir, job.compress,
                          resume.work_dir, start_at=start_at, on_step=resume.on_step(progress),
                          stage_configs=provenance or {})
        summary = {"label": job.label, "calibration": job.calibration, "method": job.compress.prune.method,
                   "sparsity": job.compress.prune.sparsity, "start_at": start_at,
                   "n_tokens": result.n_tokens, "seconds": result.seconds, "steps_computed": len(result.steps),
                   **({"allocation": result.allocation.to_json()} if result.allocation is not None else {}),
                   **({"provenance": {k: v.canonical() for k, v in provenance.items()}} if provenance else {})}
        return [ArtifactRef.of(resume.out_dir, "model")], summary

    return run_stage(env, f"{stage}/{job.label}", stage, job.compress.canonical(), list(calib.outputs),
                     compute, log, cleanup=resume.cleanup)


def eval_step(env: RunRef, label: str, cfg: EvalConfig, template_hash: str | None, model: StageOutput | None,
              prompts: StageOutput, meta: dict[str, Any], log: LogFn = print,
              progress: ProgressFn = _noop) -> StageOutput:
    """Evaluate the dense model (model=None) or a pruned one on the eval prompts; write the `evals` row.

    `template_hash`: the calibration prompts' template hash the eval prompts must carry (None: any).
    An interrupted evaluation keeps its generation shards that the index recorded and still verify, and
    generates only the rest (like the CoT stage).
    """
    key = eval_key(env, cfg, template_hash, model, prompts)
    prompts_path = prompts.output("prompts").path

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        model_dir = model.output("model").path if model else Path(env.model_dir)
        rows = folder / "rows.parquet"
        resume = CotsResume(Index(env.work_dir), env, key, eval_cots_dir(rows), log)
        kept = resume.prepare()
        if kept:
            log(f"[eval/{label}] resuming after {kept} verified generation shard(s)")
        n_prompts = pq.read_metadata(str(prompts_path)).num_rows
        total = -(-n_prompts * cfg.generation.samples_per_prompt // cfg.generation.shard_size)
        summary = evaluate(model_dir, cfg, prompts_path, rows, template_hash,
                           on_shard=resume.on_shard(progress, total))
        return [ArtifactRef.of(rows, "eval-rows"), ArtifactRef.of(rows.with_suffix(".json"), "eval-summary")], \
            to_jsonable(summary)

    refs = [*(model.outputs if model else ()), *prompts.outputs]
    out = run_stage(env, f"eval/{label}", "eval", eval_config(cfg, template_hash), refs, compute, log)
    Index(env.work_dir).record_eval(env.run_id, label, out.stage_key, {**metrics_row(out.summary), **meta})
    return out


EVAL_COLUMNS = ("n_problems", "accuracy", "ci_low", "ci_high", "mean_tokens", "median_tokens", "p90_tokens",
                "runaway_share", "wall_s", "tokens_per_s")


def metrics_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The `evals` table columns of an evaluation summary (`rac.eval.evaluate.EvalSummary`, same names)."""
    return {**{col: summary.get(col) for col in EVAL_COLUMNS}, "metrics": summary}


def proxies_step(env: RunRef, label: str, cfg: ProxyConfig, pruned: StageOutput, dense_eval: StageOutput,
                 tokerror: StageOutput | None, meta: dict[str, Any], log: LogFn = print) -> StageOutput:
    """NLL / top-1 agreement / KL of a pruned model on the dense model's held-out eval CoTs; writes the
    `proxies` row (with the reconstruction error by segment of `tokerror`, when there is one)."""
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
    Index(env.work_dir).record_proxies(env.run_id, label, out.stage_key, {**out.summary, **meta}, recon)
    return out


def tokerror_step(env: RunRef, label: str, cfg: ReportConfig, pruned: StageOutput, calib: StageOutput,
                  log: LogFn = print) -> StageOutput:
    """Per-token reconstruction-error heatmap of one pruned model on a few of its calibration sequences."""
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
