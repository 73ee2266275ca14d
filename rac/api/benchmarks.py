"""Standard benchmarks (lm-eval 0.4.x) on the dense and pruned models of a run; what `rac eval RUN --harness
lm-eval` calls.

    results = rac.api.harness("demo-20250101-120000-ab12", ["arc_easy", "hellaswag"], limit=200)
    results[0].label, results[0].value("arc_easy", "acc")

`plan_harness` checks everything before anything is written (the run and its models, the labels, lm-eval,
the backend, the include path, every task name), `run_plan` evaluates: one memoised stage
`harness/<label>/<digest>` per model (`rac.runs.memo.run_stage`: key = the `HarnessConfig`, the lm-eval
version, the model folder's recorded sha256, the include folder's sha256, the dense model's revision), its
lm-eval results in `stages/harness/<key>/results.json` and its numbers in the index table `harness_results`.
The models are the run's like `rac export` finds them: the dense model of its fingerprint, and the pruned
folders of its completed `prune/<label>` stages (`rac.reporting.export.pruned_models`). The run lock is
held while they are evaluated, so a run still computing is refused (RunLockedError) and its row is left as
it is. The task YAML files under `include_path` are part of the key; data files outside it are not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rac.api.inputs import ApiError, config_of, work_dir_of
from rac.api.results import HarnessResult, PrunedModel
from rac.config import sha256_json
from rac.eval.harness import (
    HARNESS,
    HarnessConfig,
    HarnessRun,
    check_backend,
    check_tasks,
    harness_version,
    run_harness,
    task_manager,
)
from rac.models.streaming import model_revision
from rac.reporting.export import pruned_models
from rac.runs.memo import run_stage
from rac.runs.session import UnknownRunError
from rac.runs.workdir import FileLock, RunRef, WorkDir
from rac.store.artifacts import ArtifactRef
from rac.store.index import HarnessRow, Index

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

LogFn = Callable[[str], None]
DENSE = "dense"


@dataclass(frozen=True)
class RunModel:
    """A model of a run to evaluate: its label, folder and what keys it (a pruned folder's artifact; the dense
    model is keyed by the run's model revision)."""

    label: str
    folder: Path
    inputs: tuple[ArtifactRef, ...]


@dataclass(frozen=True)
class HarnessPlan:
    """A checked harness evaluation: nothing is written until `run_plan`."""

    env: RunRef
    cfg: HarnessConfig
    models: tuple[RunModel, ...]
    include: ArtifactRef | None
    harness_version: str
    manager: TaskManager  # lm-eval's task index (its own tasks + the include folder's)

    @property
    def key_config(self) -> dict[str, Any]:
        return {**self.cfg.canonical(), "harness": HARNESS, "harness_version": self.harness_version}


def run_models(work: Path, run_id: str) -> tuple[RunRef, tuple[RunModel, ...]]:
    """The run's dense model (checked against its recorded revision) and finished pruned models."""
    index = Index(work)
    if not index.path.exists():
        raise FileNotFoundError(f"no index at {str(index.path)!r}: no run has been started in this work dir")
    row = index.get_run(run_id)
    if row is None:
        raise UnknownRunError(f"no run {run_id!r} in {index.path}; known runs: {[r['run_id'] for r in index.list_runs()]}")
    fp = row["fingerprint"]
    dense = Path(str(fp.get("model_dir", "")))
    if not (dense / "config.json").is_file():
        raise FileNotFoundError(f"the dense model folder {str(dense)!r} of run {run_id!r} is gone")
    if model_revision(dense) != fp.get("model_revision"):
        raise ValueError(f"the dense model folder {str(dense)!r} changed since run {run_id!r} recorded it "
                         f"(revision {str(fp.get('model_revision'))[:12]})")
    env = RunRef(str(work), run_id, str(dense), str(fp["model_revision"]))
    pruned = [RunModel(m.label, m.folder, (m.ref,)) for m in pruned_models(work, run_id, verify=False)]
    return env, (RunModel(DENSE, dense, ()), *pruned)


def plan_harness(run: str | PrunedModel, tasks: Sequence[str] | str, *, limit: int | None = None,
                 backend: str = "hf", include_path: Path | str | None = None, num_fewshot: int | None = None,
                 batch_size: int | None = None, dtype: str | None = None, device: str | None = None,
                 apply_chat_template: bool | None = None, models: Sequence[str] | None = None,
                 work_dir: Path | str | None = None) -> HarnessPlan:
    """Check a harness evaluation (see `harness`); ValueError / FileNotFoundError of one line, nothing written."""
    where = "harness"
    names = tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)
    cfg = config_of(HarnessConfig, where, tasks=names, limit=limit, backend=backend, num_fewshot=num_fewshot,
                    batch_size=batch_size, dtype=dtype, device=device, apply_chat_template=apply_chat_template)
    if isinstance(run, PrunedModel):
        run_id, work, models = run.run_id, run.work_dir, models or (run.label,)
    else:
        run_id, work = run, work_dir_of(work_dir)
    include = Path(include_path).expanduser().resolve() if include_path is not None else None
    if include is not None and not include.is_dir():
        raise ApiError(f"{where}: include path {str(include_path)!r} is not a folder of lm-eval task YAML files")
    env, found = run_models(work, run_id)
    if models is not None:
        unknown = [m for m in models if m not in {f.label for f in found}]
        if unknown or not models:
            raise ApiError(f"{where}: run {run_id!r} has no model(s) {unknown or list(models)}; "
                           f"its models: {[f.label for f in found]}")
        found = tuple(f for f in found if f.label in models)
    version = harness_version()
    check_backend(cfg.backend)
    manager = task_manager(include)
    check_tasks(cfg.tasks, manager)
    ref = ArtifactRef.of(include, "harness-tasks") if include is not None else None
    return HarnessPlan(env, cfg, found, ref, version, manager)


def _evaluate(plan: HarnessPlan, model: RunModel, log: LogFn) -> HarnessResult:
    env, config = plan.env, plan.key_config

    def compute(folder: Path) -> tuple[list[ArtifactRef], dict[str, Any]]:
        out = folder / "results.json"
        res = run_harness(model.folder, plan.cfg, plan.manager, out)
        return [ArtifactRef.of(out, "harness-results")], res.summary()

    inputs = [*model.inputs, *([plan.include] if plan.include is not None else [])]
    name = f"harness/{model.label}/{sha256_json(config)[:8]}"
    out = run_stage(env, name, "harness", config, inputs, compute, log)
    res = HarnessRun.from_summary(out.summary)
    rows = [HarnessRow(HARNESS, res.harness_version, res.backend, m.task, m.metric, m.filter, m.value, m.stderr,
                       m.n, m.n_total, m.num_fewshot, m.higher_is_better, str(model.folder)) for m in res.metrics]
    Index(env.work_dir).record_harness(env.run_id, model.label, out.stage_key, rows, config)
    return HarnessResult(model.label, env.run_id, out.stage_key, model.folder, HARNESS, res.harness_version,
                         res.backend, res.metrics, out.reused)


def run_plan(plan: HarnessPlan, log: LogFn = print) -> tuple[HarnessResult, ...]:
    """Evaluate every model of a checked plan under the run lock; a model evaluated before with the same key
    is reused."""
    lock = FileLock(WorkDir(Path(plan.env.work_dir)).lock_file(plan.env.run_id), f"run {plan.env.run_id!r}")
    with lock:
        return tuple(_evaluate(plan, m, log) for m in plan.models)


def harness(run: str | PrunedModel, tasks: Sequence[str] | str, *, limit: int | None = None, backend: str = "hf",
            include_path: Path | str | None = None, num_fewshot: int | None = None, batch_size: int | None = None,
            dtype: str | None = None, device: str | None = None, apply_chat_template: bool | None = None,
            models: Sequence[str] | None = None, work_dir: Path | str | None = None,
            log: LogFn = print) -> tuple[HarnessResult, ...]:
    """lm-eval `tasks` on the models of run `run` (a run id in `work_dir`, or a `PrunedModel`: its run, that
    model only). `models`: labels to evaluate (default: dense and every pruned model); `include_path`: a
    folder of task YAML files; `limit`: samples per task. Unset knobs keep `HarnessConfig`'s defaults.

        res = harness(pruned, ["rac_arith"], include_path="my_tasks", limit=50)
        res[0].value("rac_arith", "acc")
    """
    return run_plan(plan_harness(run, tasks, limit=limit, backend=backend, include_path=include_path,
                                 num_fewshot=num_fewshot, batch_size=batch_size, dtype=dtype, device=device,
                                 apply_chat_template=apply_chat_template, models=models, work_dir=work_dir), log)
