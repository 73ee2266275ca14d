"""`rac_eval`: evaluate one model folder (dense or pruned) with the `eval:` section of a run config.

The eval prompts are sampled with the model's own tokenizer (the `eval.prompts` section; its template
defaults to the config's calibration prompts template), then the model answers them and is graded. The
model folder is an input artifact (its full content hash keys the stage), so evaluating the same folder
with the same config twice does no work. The run is opened like every other (`RunSession`: lock,
fingerprint, run row); its config is {"model": ..., "eval": ...}, and a crash leaves it resumable.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from rac.data.prompts import PromptsConfig
from rac.eval.evaluate import EvalConfig
from rac.runs.memo import StageOutput
from rac.runs.run_config import RunConfigError, parse_eval_section, read_yaml
from rac.runs.session import RunSession
from rac.runs.workdir import new_run_id
from rac.store.artifacts import ArtifactRef
from rac_prefect.tasks import evaluate_task, sample_prompts_task


def eval_section(eval_config: dict[str, Any] | str) -> tuple[EvalConfig, PromptsConfig]:
    """(EvalConfig, eval PromptsConfig) from a run-config YAML path or an `eval:` mapping."""
    calib_prompts = None
    data: Any = eval_config
    if isinstance(eval_config, str):
        data = read_yaml(eval_config, "eval config")
        if isinstance(data, dict) and "eval" in data:
            calib_prompts, data = data.get("prompts"), data["eval"]
    if not isinstance(data, dict):
        raise RunConfigError(f"eval config must be a mapping, got {type(data).__name__}")
    return parse_eval_section(data, calib_prompts, source=str(eval_config)[:200])


@flow(name="rac-eval", log_prints=True)
def rac_eval(model: str, eval_config: dict[str, Any] | str, work_dir: str = "work", label: str = "model",
             run_id: str | None = None) -> dict[str, Any]:
    """Evaluate `model` (alias or folder) and return the metrics row written to the `evals` table."""
    from rac.runs.session import resolve_model_dir

    cfg, prompts_cfg = eval_section(eval_config)
    model_dir = resolve_model_dir(model)
    config = {"model": str(model_dir), "eval": {"prompts": prompts_cfg.canonical(), **cfg.canonical()}}
    session = RunSession.open(work_dir, run_id or new_run_id(f"eval-{label}"), f"eval-{label}", str(model_dir),
                              config)
    env = session.run
    try:
        prompts = sample_prompts_task(env, prompts_cfg, name="prompts/eval")
        model_out = StageOutput("model", "model", env.model_revision[:20], (ArtifactRef.of(model_dir, "model"),))
        out = evaluate_task(env, label, cfg, None, model_out, prompts, {"model": str(model_dir)})
    except BaseException as err:
        session.close("failed", f"{type(err).__name__}: {err}"[:500])
        raise
    session.close("done")
    return {"run_id": env.run_id, "stage_key": out.stage_key,
            **{k: v for k, v in out.summary.items() if not isinstance(v, dict | list)}}
