"""`rac_prune`: the whole DAG for one model.

prompts -> CoTs (only if a `rac` calibration) -> every calibration set -> eval prompts -> (dense eval) ->
for each calibration x prune config: [progressive chain] -> prune -> eval -> per-token error heatmap ->
proxies -> report. A progressive calibration's chain (rac.runs.progressive) runs before its final prune:
per step an intermediate model, its CoTs and a calibration set on them, each a task like the others.
All calibrations and sparsities of one run share the prompts and the CoTs. Stages run one after another
(2 CPU cores do not profit from running two model-sized stages at once); only the CoT shards fan out, over
the task runner of the config's `runner:` section when there is one (flows/generation.py).

Embedded (ephemeral) Prefect is used unless PREFECT_API_URL points at a server; both behave the same.
The config is parsed once: the CLI passes the typed `RunConfig`; a deployment passes `config_path`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from rac.runs.memo import StageOutput
from rac.runs.progressive import STEP_STAGE, ChainOps, run_chain
from rac.runs.run_config import RunConfig, load_run_config
from rac.runs.session import RunSession
from rac.runs.workdir import RunRef, new_run_id
from rac_prefect.flows.generation import generate_cots_stage
from rac_prefect.tasks import (
    build_calibration_task,
    evaluate_task,
    proxies_task,
    prune_task,
    report_task,
    sample_prompts_task,
    token_error_task,
)
from rac_prefect.tasks.progress import log


def _load(config: RunConfig | None, config_path: str | None) -> RunConfig:
    if config is not None:
        return config
    if config_path:
        return load_run_config(config_path)
    raise ValueError("rac_prune needs `config` (a RunConfig) or `config_path` (a YAML run config)")


def run_dag(session: RunSession, cfg: RunConfig) -> dict[str, Any]:
    """Every stage of a run, in order; returns the stage outputs by name and the report paths."""
    env = session.run
    done: dict[str, StageOutput] = {}
    prompts = sample_prompts_task(env, cfg.prompts)
    done[prompts.name] = prompts
    cots = None
    if cfg.generate is not None and cfg.needs_cots():
        cots = generate_cots_stage(env, cfg.generate, prompts, cfg.runner)
    if cots is not None:
        done[cots.name] = cots
    calibs: dict[str, StageOutput] = {}
    for name, ccfg in cfg.calibrations.items():  # a progressive one: its first set, on the dense CoTs
        calib = build_calibration_task(env, name, ccfg.one_shot(), prompts if ccfg.kind in ("prompt", "rac") else None,
                                       cots if ccfg.kind == "rac" else None)
        calibs[name] = done[calib.name] = calib
        note = session.note_calibration(name, calib.output("calibration").sha256)
        if note:
            log(note)
    eval_cfg, eval_prompts = cfg.eval, None
    template = prompts.summary.get("template", {}).get("hash")  # the eval prompts must carry it too
    if cfg.eval_prompts is not None:
        eval_prompts = sample_prompts_task(env, cfg.eval_prompts, name="prompts/eval")
        done[eval_prompts.name] = eval_prompts
    dense_eval = None
    if eval_cfg is not None and eval_prompts is not None and cfg.eval_dense:
        meta = {"model": "dense", "calibration": None, "method": None, "sparsity": 0.0}
        dense_eval = done["eval/dense"] = evaluate_task(env, "dense", eval_cfg, template, None,
                                                                      eval_prompts, meta)
    for job in cfg.jobs:
        calib_for, provenance = calibs[job.calibration], None
        if cfg.calibrations[job.calibration].progressive is not None:
            assert cots is not None  # a progressive calibration is kind rac: the run generated the dense CoTs
            chain = run_chain(job, cfg.calibrations[job.calibration], calib_for, cots, _chain_ops(env, cfg, prompts))
            done.update(chain.stages)
            calib_for, provenance = chain.calib, {"progressive": chain.record}
        pruned = prune_task(env, job, calib_for, provenance=provenance)
        done[pruned.name] = pruned
        meta = {"model": job.label, "calibration": job.calibration, "method": job.compress.prune.method,
                "sparsity": job.compress.prune.sparsity}
        if eval_cfg is not None and eval_prompts is not None and cfg.evaluates(job):
            out = evaluate_task(env, job.label, eval_cfg, template, pruned, eval_prompts, meta)
            done[out.name] = out
        heat = None
        if cfg.report.heatmap:
            calib = calibs[cfg.heatmap_calibration(job)]
            heat = done[f"tokerror/{job.label}"] = token_error_task(env, job.label, cfg.report, pruned, calib)
        if cfg.proxies is not None and dense_eval is not None:
            out = proxies_task(env, job.label, cfg.proxies, pruned, dense_eval, heat, meta)
            done[out.name] = out
    paths = report_task(env)
    return {"run_id": env.run_id, "report": paths[0] if paths else None, "reports": paths,
            "stages": {k: {"stage_key": v.stage_key, "reused": v.reused, "outputs": [r.uri for r in v.outputs]}
                       for k, v in done.items()}}


def _chain_ops(env: RunRef, cfg: RunConfig, prompts: StageOutput) -> ChainOps:
    """A progressive chain's stages as tasks: step models, their CoTs (on the run's runner), their sets."""
    assert cfg.generate is not None  # a progressive calibration is kind rac: the run generates CoTs
    gen = cfg.generate
    return ChainOps(
        prune=lambda job, calib: prune_task(env, job, calib, stage=STEP_STAGE),
        cots=lambda model, name: generate_cots_stage(env, gen, prompts, cfg.runner, model=model, name=name),
        calib=lambda name, ccfg, step_cots: build_calibration_task(env, name, ccfg, prompts, step_cots),
    )


@flow(name="rac-prune", log_prints=True, validate_parameters=False)
def rac_prune(config: RunConfig | None = None, config_path: str | None = None, run_id: str | None = None,
              work_dir: str = "work") -> dict[str, Any]:
    """Run (or resume, for an existing run id) a whole rac run; a new run id is made when none is given."""
    cfg = _load(config, config_path)
    session = RunSession.open(work_dir, run_id or new_run_id(cfg.name), cfg.name, cfg.model, cfg.canonical(),
                              config_path or "")
    try:
        result = run_dag(session, cfg)
    except BaseException as err:
        session.close("failed", f"{type(err).__name__}: {err}"[:500])
        raise
    session.close("done")
    return result
