"""The pipeline's Prefect tasks: thin wrappers over `rac.runs.stages`, exchanging `StageOutput` references.

Caching is the index's, not Prefect's: a task body calls its step, whose `run_stage` finds a completed
stage with the same key whose outputs still verify and reuses it without computing anything
(`rac.runs.memo`). Prefect persists no task results (`persist_result=False`, no cache policy), so nothing
in the work dir is ever unpickled: what a task returns is a `StageOutput` of artifact references that the
next task verifies by hash before use.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from rac.config import StageConfig
from rac.data.calib import CalibConfig
from rac.data.generate import GenerateConfig
from rac.data.prompts import PromptsConfig
from rac.eval.evaluate import EvalConfig
from rac.eval.proxies import ProxyConfig
from rac.reporting.report import report_markdown_for_artifact, write_report
from rac.runs import stages as steps
from rac.runs.memo import StageOutput
from rac.runs.run_config import PruneJob, ReportConfig
from rac.runs.workdir import RunRef
from rac_prefect.tasks.progress import TaskProgress, artifact_key, generation_key, log


@task(name="sample-prompts", persist_result=False, cache_policy=NO_CACHE)
def sample_prompts_task(env: RunRef, cfg: PromptsConfig, name: str = "prompts") -> StageOutput:
    return steps.prompts_step(env, cfg, log=log, name=name)


@task(name="generate-cots", persist_result=False, cache_policy=NO_CACHE)
def generate_cots_task(env: RunRef, cfg: GenerateConfig, prompts: StageOutput, model: StageOutput | None = None,
                       name: str = "cots") -> StageOutput:
    """CoTs of the dense model, or of a progressive step's pruned `model` (stage `name`)."""
    with TaskProgress("generation", generation_key(env, name)) as progress:
        return steps.cots_step(env, cfg, prompts, progress=progress, log=log, model=model, name=name)


@task(name="build-calibration", persist_result=False, cache_policy=NO_CACHE)
def build_calibration_task(env: RunRef, name: str, cfg: CalibConfig, prompts: StageOutput | None,
                           cots: StageOutput | None) -> StageOutput:
    return steps.calib_step(env, name, cfg, prompts, cots, log=log)


@task(name="prune", persist_result=False, cache_policy=NO_CACHE)
def prune_task(env: RunRef, job: PruneJob, calib: StageOutput, provenance: Mapping[str, StageConfig] | None = None,
               stage: str = "prune") -> StageOutput:
    """Statistics + pruning, layer by layer; progress per (layer, group) step. `stage`: "prune", or
    "prune-step" for an intermediate model of a progressive chain; `provenance`: recorded with the model."""
    with TaskProgress(f"pruning {job.label}", f"{env.run_id}-{stage}-{job.label}") as progress:
        return steps.prune_step(env, job, calib, progress=progress, log=log, provenance=provenance, stage=stage)


@task(name="evaluate", persist_result=False, cache_policy=NO_CACHE)
def evaluate_task(env: RunRef, label: str, cfg: EvalConfig, template_hash: str | None, model: StageOutput | None,
                  prompts: StageOutput, meta: dict[str, Any]) -> StageOutput:
    """Generate + grade answers of one model on the eval prompts; a Markdown artifact with its metrics."""
    with TaskProgress(f"evaluating {label}", f"{env.run_id}-evaluate-{label}") as progress:
        out = steps.eval_step(env, label, cfg, template_hash, model, prompts, meta, log=log, progress=progress)
    row = steps.metrics_row(out.summary)
    create_markdown_artifact(
        f"**{label}**: accuracy {row['accuracy']} (95% CI {row['ci_low']}..{row['ci_high']}), "
        f"mean CoT tokens {row['mean_tokens']}, runaway share {row['runaway_share']}",
        key=artifact_key(f"{env.run_id}-eval-{label}"), description=f"evaluation of {label}",
    )
    return out


@task(name="token-error", persist_result=False, cache_policy=NO_CACHE)
def token_error_task(env: RunRef, label: str, cfg: ReportConfig, pruned: StageOutput,
                     calib: StageOutput) -> StageOutput:
    return steps.tokerror_step(env, label, cfg, pruned, calib, log=log)


@task(name="proxies", persist_result=False, cache_policy=NO_CACHE)
def proxies_task(env: RunRef, label: str, cfg: ProxyConfig, pruned: StageOutput, dense_eval: StageOutput,
                 tokerror: StageOutput | None, meta: dict[str, Any]) -> StageOutput:
    """Forward-pass proxies of one pruned model on the dense model's eval CoTs."""
    return steps.proxies_step(env, label, cfg, pruned, dense_eval, tokerror, meta, log=log)


@task(name="report", persist_result=False, cache_policy=NO_CACHE)
def report_task(env: RunRef) -> list[str]:
    """Write the run's Markdown + PNG report and publish the Markdown as a Prefect artifact."""
    paths = write_report(Path(env.work_dir), env.run_id, status="done")  # the run's last step
    create_markdown_artifact(report_markdown_for_artifact(paths[0]), key=artifact_key(f"{env.run_id}-report"),
                             description=f"rac report of run {env.run_id}")
    return [str(p) for p in paths]
