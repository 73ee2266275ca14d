"""The pipeline's Prefect tasks: thin wrappers over `rac.runs.stages`, exchanging `StageOutput` references.

Caching: each task's `cache_key_fn` returns `rac-<stage>-<key>` (key = sha256 of stage config, input
artifact hashes, model revision, rac version; see `rac.runs.memo.stage_key`) only when the index holds a
completed stage with that key whose outputs still verify; otherwise None (no cache, the body runs and
recomputes what is missing or corrupt). Results persist in the run folder (`runs/<id>/prefect/`, set by
the flow through `with_options(result_storage=...)`). Across runs of one work dir the index does the
reuse: the body finds the verified stage and records it as reused without computing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from rac.data.calib import CalibConfig
from rac.data.generate import GenerateConfig
from rac.data.prompts import PromptsConfig
from rac.eval.evaluate import EvalConfig
from rac.eval.proxies import ProxyConfig
from rac.reporting.report import write_report
from rac.runs import stages as steps
from rac.runs.memo import StageOutput, find_done
from rac.runs.run_config import PruneJob, ReportConfig
from rac.runs.workdir import RunRef
from rac.store.index import Index
from rac_prefect.tasks.progress import TaskProgress, artifact_key, log

KeyFn = Callable[[dict[str, Any]], str]


def verified_cache_key(stage: str, key_of: KeyFn) -> Callable[[TaskRunContext, dict[str, Any]], str | None]:
    """A Prefect cache_key_fn: the stage key when its recorded outputs verify, else None (run the body)."""

    def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        key = key_of(parameters)
        row, _ = find_done(Index(parameters["env"].work_dir), key)
        job = parameters.get("job")
        label = parameters.get("name") or parameters.get("label") or (job.label if job is not None else "")
        return f"rac-{stage}-{key}-{artifact_key(str(label))}" if row is not None else None

    return cache_key


@task(name="sample-prompts", persist_result=True,
      cache_key_fn=verified_cache_key("prompts", lambda p: steps.prompts_key(p["env"], p["cfg"])))
def sample_prompts_task(env: RunRef, cfg: PromptsConfig, name: str = "prompts") -> StageOutput:
    return steps.prompts_step(env, cfg, log=log, name=name)


@task(name="generate-cots", persist_result=True,
      cache_key_fn=verified_cache_key("cots", lambda p: steps.cots_key(p["env"], p["cfg"], p["prompts"])))
def generate_cots_task(env: RunRef, cfg: GenerateConfig, prompts: StageOutput) -> StageOutput:
    with TaskProgress("generation", f"{env.run_id}-generation") as progress:
        return steps.cots_step(env, cfg, prompts, progress=progress, log=log)


def _calib_inputs(p: dict[str, Any]) -> list[StageOutput]:
    return [s for s in (p["prompts"], p["cots"]) if s is not None]


@task(name="build-calibration", persist_result=True,
      cache_key_fn=verified_cache_key("calib", lambda p: steps.calib_key(p["env"], p["cfg"], _calib_inputs(p))))
def build_calibration_task(env: RunRef, name: str, cfg: CalibConfig, prompts: StageOutput | None,
                           cots: StageOutput | None) -> StageOutput:
    return steps.calib_step(env, name, cfg, prompts, cots, log=log)


@task(name="prune", persist_result=True,
      cache_key_fn=verified_cache_key("prune", lambda p: steps.prune_key(p["env"], p["job"], p["calib"])))
def prune_task(env: RunRef, job: PruneJob, calib: StageOutput) -> StageOutput:
    """Statistics + pruning, layer by layer; progress per (layer, group) step."""
    with TaskProgress(f"pruning {job.label}", f"{env.run_id}-prune-{job.label}") as progress:
        return steps.prune_step(env, job, calib, progress=progress, log=log)


@task(name="evaluate", persist_result=True,
      cache_key_fn=verified_cache_key("eval", lambda p: steps.eval_key(p["env"], p["cfg"], p["template_hash"],
                                                                       p["model"], p["prompts"])))
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


@task(name="token-error", persist_result=True)
def token_error_task(env: RunRef, label: str, cfg: ReportConfig, pruned: StageOutput,
                     calib: StageOutput) -> StageOutput:
    return steps.tokerror_step(env, label, cfg, pruned, calib, log=log)


@task(name="proxies", persist_result=True)
def proxies_task(env: RunRef, label: str, cfg: ProxyConfig, pruned: StageOutput, dense_eval: StageOutput,
                 tokerror: StageOutput | None, meta: dict[str, Any]) -> StageOutput:
    """Forward-pass proxies of one pruned model on the dense model's eval CoTs."""
    return steps.proxies_step(env, label, cfg, pruned, dense_eval, tokerror, meta, log=log)


@task(name="report")
def report_task(env: RunRef) -> list[str]:
    """Write the run's Markdown + PNG report and publish the Markdown as a Prefect artifact."""
    paths = write_report(Path(env.work_dir), env.run_id)
    create_markdown_artifact(paths[0].read_text(), key=artifact_key(f"{env.run_id}-report"),
                             description=f"rac report of run {env.run_id}")
    return [str(p) for p in paths]
