"""`rac_eval`: evaluate one model folder (dense or pruned) with an `eval` config, recorded in the index.

The run row gets the config {"model": ..., "eval": ...}; the evaluation is a memoised stage like in
`rac_prune`, so evaluating the same model folder with the same config twice does no work.
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
from rac.runconfig import RunConfigError, stage_classes
from tasks import evaluate_task


def _eval_config(eval_config: dict[str, Any] | str) -> Any:
    data = eval_config
    if isinstance(eval_config, str):
        data = yaml.safe_load(Path(eval_config).read_text())
        data = data.get("eval", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise RunConfigError(f"eval config must be a mapping, got {type(data).__name__}")
    return stage_classes()["eval"](**data)


@flow(name="rac-eval", log_prints=True)
def rac_eval(model: str, eval_config: dict[str, Any] | str, work_dir: str = "work", label: str = "model",
             run_id: str | None = None) -> dict[str, Any]:
    """Evaluate `model` (alias or folder) and return the metrics row written to the `evals` table."""
    from rac.models.assets import resolve_model

    cfg = _eval_config(eval_config)
    model_dir = Path(resolve_model(model)).resolve()
    run_id = check_run_id(run_id or new_run_id(f"eval-{label}"))
    config = {"model": str(model_dir), "eval": cfg.canonical()}
    fp = fingerprint(model_dir, config)
    env = RunEnv(str(Path(work_dir).resolve()), run_id, str(model_dir), fp["model_revision"])
    index = Index(env.work_dir)
    with FileLock(env.lock_file, f"run {run_id!r}"):
        if index.get_run(run_id) is None:
            index.create_run(run_id, f"eval-{label}", config, fp, "", os.getpid())
        # a model folder is evaluated as an input artifact (its content hash keys the stage)
        model_out = StageOutput("model", "model", fp["model_revision"][:20],
                                (ArtifactRef.of(model_dir, "model"),))
        out = evaluate_task.with_options(result_storage=Path(env.prefect_dir))(
            env, label, cfg, model_out, {"model": str(model_dir)})
        index.set_run(run_id, "done")
    return {"run_id": run_id, "stage": out.key, **{k: v for k, v in out.summary.items() if not isinstance(v, dict | list)}}
