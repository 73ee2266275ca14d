"""The cots stage of `rac_prune`, on the task runner of the run config's `runner:` section.

Without a `runner:` section the stage runs as before (one task, one engine, shards in order). With one,
`rac-generate-cots` runs as a subflow whose task runner (threads, a Dask cluster, Ray) is built from the
config: the cluster lives only while CoTs are generated, and every other stage stays in the flow process.
"""

from __future__ import annotations

from prefect import flow

from rac.data.generate import GenerateConfig
from rac.runs.memo import StageOutput
from rac.runs.run_config import RunnerConfig
from rac.runs.workdir import RunRef
from rac_prefect.tasks import generate_cots_task
from rac_prefect.tasks.generation import build_task_runner, generate_cots_fanout_task


@flow(name="rac-generate-cots", log_prints=True)
def cots_flow(env: RunRef, cfg: GenerateConfig, prompts: StageOutput, runner: RunnerConfig,
              model: StageOutput | None = None, name: str = "cots") -> StageOutput:
    """Generate the CoTs with one mapped task per shard (the subflow's task runner runs them)."""
    return generate_cots_fanout_task(env, cfg, prompts, runner, model, name)


def generate_cots_stage(env: RunRef, cfg: GenerateConfig, prompts: StageOutput, runner: RunnerConfig | None,
                        model: StageOutput | None = None, name: str = "cots") -> StageOutput:
    """The cots stage: in-process without a runner, else fanned out by a subflow on the runner. `model`: a
    progressive step's pruned model generates (same prompts, seeds, sampling and budgets), as stage `name`."""
    if runner is None:
        return generate_cots_task(env, cfg, prompts, model, name)
    return cots_flow.with_options(task_runner=build_task_runner(runner))(env, cfg, prompts, runner, model, name)
