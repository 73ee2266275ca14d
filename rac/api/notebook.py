"""calibrate -> prune -> evaluate from Python, through the same stages, cache and index as `rac run`.

    import rac.api
    cal = rac.api.calibrate("tiny-llama", ["What is 2 + 3?", "What is 7 - 4?"], kind="prompt", token_budget=64)
    pruned = rac.api.prune("tiny-llama", cal, method="sparsegpt", sparsity=0.5)
    ev = rac.api.evaluate(pruned, [{"prompt": "What is 2 + 3?", "answer": "5"}])

Each call opens the run like a flow does (`rac.runs.session.RunSession`: run lock, fingerprint, run row) and
runs the `rac.runs.stages` steps `rac run` runs, so a stage with the same config and inputs is found in the
index and reused (from any run of the work dir, CLI runs included), and everything computed is in `rac sql`
and `rac status`. A `calibrate` starts a run (`api-<time>-<hex>`, or `run_id=`) bound to its model; `prune`
and `evaluate` of its results continue that run. The work dir is `work_dir=`, else $RAC_WORK_DIR, else
./work, like the CLI's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rac.api.inputs import (
    API_SOURCE,
    ApiError,
    ConfigValue,
    Prompts,
    config_of,
    model_of,
    prompts_config,
    work_dir_of,
)
from rac.api.results import Calibration, EvalResult, PrunedModel
from rac.data.calib import CalibConfig
from rac.data.generate import GenerateConfig
from rac.data.templates import TemplateConfig
from rac.engine.sequential import CompressConfig
from rac.eval.evaluate import EvalConfig
from rac.pruners.base import PruneConfig
from rac.reporting.export import safetensors_numels
from rac.runs import stages as steps
from rac.runs.memo import StageOutput
from rac.runs.run_config import PruneJob, prune_label
from rac.runs.session import RunSession
from rac.runs.workdir import new_run_id
from rac.store.index import Index, LayerRow

RUN_NAME = "api"
LogFn = Callable[[str], None]


def _run_config(model_dir: Path) -> dict[str, str]:
    """The config an API run is bound to (with the model revision, through the fingerprint)."""
    return {"source": API_SOURCE, "model": str(model_dir)}


@contextmanager
def _session(work: Path, run_id: str | None, model_dir: Path) -> Iterator[RunSession]:
    """An open run (new, or continued when `run_id` exists); closed done, or failed on an error."""
    session = RunSession.open(work, run_id or new_run_id(RUN_NAME), RUN_NAME, str(model_dir), _run_config(model_dir))
    try:
        yield session
    except BaseException as err:
        session.close("failed", f"{type(err).__name__}: {err}"[:500])
        raise
    session.close("done")


def calibrate(model: Path | str, prompts: Prompts | None = None, *, kind: str = "rac", name: str | None = None,
              token_budget: int | None = None, max_seq_len: int | None = None, min_decode_share: float | None = None,
              decode_share: float | None = None, seed: int | None = None, generate: GenerateConfig | None = None,
              template: TemplateConfig | None = None,
              run_id: str | None = None, work_dir: Path | str | None = None, log: LogFn = print) -> Calibration:
    """Build a calibration set on `model` from `prompts` (kind rac: prompts + the model's own CoTs, sampled
    with `generate`; prompt: the prompts alone; generic / self: no prompts). Unset knobs keep
    `rac.data.calib.CalibConfig`'s defaults (`decode_share`: rac only, the exact share of decode tokens).

        cal = calibrate("tiny-llama", ["What is 2 + 3?"], kind="rac", token_budget=256,
                        generate=GenerateConfig(max_new_tokens=32, token_budget=None, dtype="float32"))
    """
    where = "calibrate"
    ccfg = config_of(CalibConfig, where, kind=kind, token_budget=token_budget, max_seq_len=max_seq_len,
                     min_decode_share=min_decode_share, decode_share=decode_share, seed=seed)
    needs_prompts = ccfg.kind in ("prompt", "rac")
    if needs_prompts and prompts is None:
        raise ApiError(f"{where}: kind {ccfg.kind!r} needs prompts")
    if not needs_prompts and prompts is not None:
        raise ApiError(f"{where}: kind {ccfg.kind!r} takes no prompts (it calibrates on "
                       f"{'news text' if ccfg.kind == 'generic' else 'unconditional samples'})")
    set_name = name or ccfg.kind
    model_dir, _ = model_of(model, where)
    work = work_dir_of(work_dir)
    pcfg = prompts_config(prompts, work, template, where, need_answers=False) if prompts is not None else None
    with _session(work, run_id, model_dir) as session:
        env = session.run
        p = steps.prompts_step(env, pcfg, log) if pcfg is not None else None
        cots = None
        if ccfg.kind == "rac" and p is not None:
            cots = steps.cots_step(env, generate or GenerateConfig(), p, log=log)
        out = steps.calib_step(env, set_name, ccfg, p, cots, log)
        note = session.note_calibration(set_name, out.output("calibration").sha256)
        if note:
            log(note)
    s = out.summary
    tinfo = p.summary.get("template", {}) if p is not None else {}
    return Calibration(
        name=set_name, kind=ccfg.kind, run_id=env.run_id, work_dir=work, stage_key=out.stage_key,
        path=out.output("calibration").path, artifact=out.output("calibration"), model=Path(env.model_dir),
        model_revision=env.model_revision, n_seqs=int(s["n_seqs"]), n_tokens=int(s["n_tokens"]),
        decode_share=float(s["decode_share"]), prompt_share=float(s["prompt_share"]),
        other_share=float(s["other_share"]), exhausted=bool(s["exhausted"]),
        template=pcfg.template if pcfg is not None else None, template_hash=tinfo.get("hash"), reused=out.reused)


def _calib_output(cal: Calibration) -> StageOutput:
    return StageOutput(f"calib/{cal.name}", "calib", cal.stage_key, (cal.artifact,))


def _records(index: Index, stage_key: str) -> tuple[LayerRow, ...]:
    fields = LayerRow.__dataclass_fields__
    return tuple(LayerRow(**{k: v for k, v in r.items() if k in fields}) for r in index.layer_rows(stage_key))


def achieved_sparsity(folder: Path, records: tuple[LayerRow, ...]) -> float:
    """sum(zeros) / sum(weights) over the pruned linears: each record's sparsity weighted by its weight's
    element count (from the safetensors headers of `folder`)."""
    numels = safetensors_numels(folder)
    sizes = [numels[f"{r.linear}.weight"] for r in records]
    return sum(r.sparsity * n for r, n in zip(records, sizes, strict=True)) / max(1, sum(sizes))


def prune(model: Path | str, calibration: Calibration, method: str = "sparsegpt", sparsity: float | None = None,
          nm: tuple[int, int] | None = None, *, solver: Mapping[str, ConfigValue] | None = None,
          engine: Mapping[str, ConfigValue] | None = None, label: str | None = None,
          log: LogFn = print) -> PrunedModel:
    """Prune `model` on `calibration` (built on the same model), streamed layer by layer, into a Hugging Face
    folder. `solver`: more `rac.pruners.base.PruneConfig` fields (damp, blocksize, scope, ...); `engine`:
    `rac.engine.CompressConfig` fields (act_dtype, compute_dtype, device, include, exclude, ...).

        pruned = prune("tiny-llama", cal, method="wanda", nm=(2, 4), engine={"compute_dtype": "float32"})
    """
    where = "prune"
    if not isinstance(calibration, Calibration):
        raise ApiError(f"{where}: calibration is a {type(calibration).__name__}; give the result of calibrate()")
    pcfg = config_of(PruneConfig, where, **{**(solver or {}), "method": method, "sparsity": sparsity,
                                            "nm": tuple(nm) if nm is not None else None})
    ccfg = config_of(CompressConfig, where, **{**(engine or {}), "prune": pcfg})
    _, revision = model_of(model, where)
    if revision != calibration.model_revision:
        raise ApiError(f"{where}: model {str(model)!r} (revision {revision[:12]}) is not the model calibration "
                       f"{calibration.name!r} was built with ({calibration.model}, revision "
                       f"{calibration.model_revision[:12]})")
    weights = ccfg.segment_weights if "segment_weights" in (engine or {}) else None  # given: in the label (-p1d3)
    job = PruneJob(label or prune_label(calibration.name, pcfg, segment_weights=weights), calibration.name, ccfg)
    with _session(calibration.work_dir, calibration.run_id, calibration.model) as session:
        out = steps.prune_step(session.run, job, _calib_output(calibration), log=log)
    folder = out.output("model").path
    records = _records(Index(calibration.work_dir), out.stage_key)
    return PrunedModel(
        label=job.label, run_id=calibration.run_id, work_dir=calibration.work_dir, stage_key=out.stage_key,
        folder=folder, artifact=out.output("model"), base_model=calibration.model, base_revision=revision,
        calibration=calibration, method=pcfg.method, sparsity=float(pcfg.sparsity or 0.0), nm=pcfg.nm,
        achieved_sparsity=achieved_sparsity(folder, records), records=records,
        n_tokens=int(out.summary.get("n_tokens", 0)), reused=out.reused)


def evaluate(model: PrunedModel | Path | str, problems: Prompts, *, generation: GenerateConfig | None = None,
             bootstrap: int | None = None, seed: int | None = None, template: TemplateConfig | None = None,
             label: str | None = None, run_id: str | None = None, work_dir: Path | str | None = None,
             log: LogFn = print) -> EvalResult:
    """The model answers `problems` (each needs an `answer`), graded strictly (last boxed answer, math-verify):
    accuracy with a 95% interval, CoT length, runaway share. A `PrunedModel` is evaluated in its run with its
    calibration's chat template; a model name or folder is evaluated as `dense` (in run `run_id`, else a new
    run). `generation` must have `token_budget=None` (every problem is answered).

        ev = evaluate(pruned, [{"prompt": "What is 2 + 3?", "answer": "5"}],
                      generation=GenerateConfig(max_new_tokens=64, token_budget=None))
    """
    where = "evaluate"
    ecfg = config_of(EvalConfig, where, generation=generation, bootstrap=bootstrap, seed=seed)
    pruned: PrunedModel | None = None
    expect: str | None = None  # the template hash the eval prompts must carry (a pruned model's calibration's)
    run: str | None = run_id  # the run to continue (None: a new one)
    if isinstance(model, PrunedModel):
        pruned = model
        model_dir, work, run = model.base_model, model.work_dir, model.run_id
        template = template or model.calibration.template
        expect = model.calibration.template_hash
        meta: dict[str, Any] = {"model": model.label, "calibration": model.calibration.name,
                                "method": model.method, "sparsity": model.sparsity}
    else:
        model_dir, _ = model_of(model, where)
        work = work_dir_of(work_dir)
        meta = {"model": "dense", "calibration": None, "method": None, "sparsity": 0.0}
    name = label or (pruned.label if pruned is not None else "dense")
    pcfg = prompts_config(problems, work, template, where, need_answers=True)
    with _session(work, run, model_dir) as session:
        env = session.run
        p = steps.prompts_step(env, pcfg, log, name="prompts/eval")
        model_out = StageOutput(f"prune/{pruned.label}", "prune", pruned.stage_key, (pruned.artifact,)) \
            if pruned is not None else None
        out = steps.eval_step(env, name, ecfg, expect, model_out, p, meta, log=log)
    s = out.summary
    return EvalResult(
        label=name, run_id=env.run_id, work_dir=work, stage_key=out.stage_key,
        model=pruned.folder if pruned is not None else model_dir, n_problems=int(s["n_problems"]),
        n_samples=int(s["n_samples"]), accuracy=float(s["accuracy"]), ci_low=float(s["ci_low"]),
        ci_high=float(s["ci_high"]), mean_tokens=float(s["mean_tokens"]), median_tokens=float(s["median_tokens"]),
        p90_tokens=float(s["p90_tokens"]), runaway_share=float(s["runaway_share"]), wall_s=float(s["wall_s"]),
        tokens_per_s=float(s["tokens_per_s"]), rows_path=Path(s["rows_path"]), reused=out.reused)
