"""`rac_eval`: evaluate one model folder (dense or pruned) with the `eval:` section of a run config.

The eval prompts are sampled with the model's own tokenizer (the `eval.prompts` section; its template
defaults to the config's calibration prompts template), then the model answers them and is graded. The
model folder is an input artifact (its full content hash keys the stage), so evaluating the same folder
with the same config twice does no work. The run row gets the config {"model": ..., "eval": ...}.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from rac.artifacts import ArtifactRef
from rac.index import Index
from rac.pipeline import RunEnv, StageOutput
from rac.run import FileLock, check_run_id, fingerprint, new_run_id
from rac.runconfig import RunConfigError, parse_eval_section
from tasks import evaluate_task, sample_prompts_task


def _eval_section(eval_config: dict[str, Any] | str) -> tuple[Any, Any]:
    """(EvalConfig placeholder, eval PromptsConfig) from a run-config YAML path or an `eval:` mapping."""
    calib_prompts = None
    data: Any = eval_config
    if isinstance(eval_config, str):
        data = yaml.safe_load(Path(eval_config).read_text())
        if isinstance(data, dict) and "eval" in data:
            calib_prompts, data = data.get("prompts"), data["eval"]
    if not isinstance(data, dict):
        raise RunConfigError(f"eval config must be a mapping, got {type(data).__name__}")
    return parse_eval_section(data, calib_prompts, source=str(eval_config)[:200])


@flow(name="rac-eval", log_prints=True)
def rac_eval(model: str, eval_config: dict[str, Any] | str, work_dir: str = "work", label: str = "model",
             run_id: str | None = None) -> dict[str, Any]:
    """Evaluate `model` (alias or folder) and return the metrics row written to the `evals` table."""
    from rac.models.assets import resolve_model

    placeholder, prompts_cfg = _eval_section(eval_config)
    model_dir = Path(resolve_model(model)).resolve()
    run_id = check_run_id(run_id or new_run_id(f"eval-{label}"))
    config = {"model": str(model_dir), "eval": {"prompts": prompts_cfg.canonical(), **placeholder.canonical()}}
    fp = fingerprint(model_dir, config)
    env = RunEnv(str(Path(work_dir).resolve()), run_id, str(model_dir), fp["model_revision"])
    index = Index(env.work_dir)
    with FileLock(env.lock_file, f"run {run_id!r}"):
        if index.get_run(run_id) is None:
            index.create_run(run_id, f"eval-{label}", config, fp, "", os.getpid())
        store = Path(env.prefect_dir)
        prompts = sample_prompts_task.with_options(result_storage=store)(env, prompts_cfg, name="prompts/eval")
        fields = {k: v for k, v in placeholder.canonical().items() if k not in ("prompts_path", "expect_template_hash")}
        cfg = type(placeholder)(prompts_path=str(prompts.output("prompts").path), **fields)
        model_out = StageOutput("model", "model", fp["model_revision"][:20], (ArtifactRef.of(model_dir, "model"),))
        out = evaluate_task.with_options(result_storage=store)(env, label, cfg, model_out, prompts,
                                                               {"model": str(model_dir)})
        index.set_run(run_id, "done")
    return {"run_id": run_id, "stage": out.key,
            **{k: v for k, v in out.summary.items() if not isinstance(v, dict | list)}}
