"""The YAML run config: one file composing every stage config of a `rac run`.

    name: demo                      # run name (run ids are <name>-<time>-<hex> unless --run-id)
    model: smollm2-135m             # alias (rac.models.assets.ALIASES) or a local HF folder
    prompts:   {...}                # rac.data.prompts PromptsConfig: calibration prompts
    generate:  {...}                # rac.data.generate GenerateConfig: on-policy CoTs (only if a `rac` calibration)
    calibrations:                   # name -> rac.data.calib CalibConfig; all share the prompts and CoTs
      prompt: {kind: prompt, ...}
      rac:    {kind: rac, ...}
      rac-progressive: {kind: rac, progressive: {steps: [0.3]}, ...}   # rac.runs.progressive
    compress:  {...}                # rac.engine CompressConfig fields except `prune`
    prune:                          # list of rac.pruners PruneConfig; every calibration x every entry
      - {method: sparsegpt, sparsity: 0.5}
      - {method: sparsegpt, sparsity: 0.5, segment_weights: {prompt: 1, decode: 3}, calibrations: [rac]}
                                    # run-level keys of an entry (rac.runs.prune_jobs): its own segment weights
                                    # (label ...-p1d3), the calibrations it prunes with (default: all)
    eval:                           # omitted: no evaluation
      prompts: {...}                # PromptsConfig of the eval set (e.g. holdout: eval); its template
                                    # defaults to the calibration prompts' template
      generation: {...}             # + every rac.eval EvalConfig field (generation, bootstrap, seed, ...)
    eval_dense: true                # also evaluate the dense model
    eval_pruned: true               # evaluate every pruned model (default), false: none, or a list of labels
                                    # (e.g. [rac-sparsegpt-50pct]); the others still get heatmaps and proxies
    report:    {...}                # ReportConfig below
    proxies:   {...}                # omitted: none. rac.eval.proxies ProxyConfig: NLL / top-1 agreement / KL
                                    # of every pruned model on the dense model's eval CoTs (needs eval and
                                    # eval_dense), joined in the `proxies` table with the reconstruction
                                    # error by segment of the heatmap stage
    runner:    {...}                # omitted: CoTs generated in-process. RunnerConfig below: shards fanned
                                    # out over threads / Dask / Ray (docs/SCALING.md); not part of any key

Validation collects every problem (unknown keys listed with the known ones, bad values named with their
dotted path) into one RunConfigError (a ValueError). Nothing is resolved or written while parsing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from rac.config import StageConfig
from rac.data.calib import CalibConfig
from rac.data.generate import GenerateConfig
from rac.data.prompts import PromptsConfig
from rac.eval.evaluate import EvalConfig
from rac.eval.proxies import ProxyConfig
from rac.runs.prune_jobs import PruneEntry, PruneJob, parse_jobs
from rac.runs.prune_jobs import prune_label as prune_label  # re-exported for the stages and the API
from rac.runs.sections import build_section

TOP_KEYS = ("name", "model", "prompts", "generate", "calibrations", "compress", "prune", "eval",
            "eval_dense", "eval_pruned", "report", "proxies", "runner")
REQUIRED_KEYS = ("model", "prompts", "calibrations", "prune")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


class RunConfigError(ValueError):
    """A run config that cannot be used; the message lists every problem found."""


class ReportConfig(StageConfig):
    """What `rac report` draws: the metrics table/plots and the per-token reconstruction-error heatmap."""

    heatmap: bool = True
    heatmap_sequences: int = 2
    heatmap_max_tokens: int = 1024
    # calibration set whose sequences the heatmaps of every pruned model use (same tokens for all);
    # None: the first `rac` calibration, else each model's own
    heatmap_calibration: str | None = None


class RunnerConfig(StageConfig):
    """Where the CoT shards of a run execute (the `runner:` section; plain data, no Prefect).

        runner:
          kind: dask            # thread (default) | dask | ray
          address: null         # dask: a scheduler address ("tcp://host:8786"); ray: a cluster
                                # ("ray://..."/"auto"); null: a local cluster started for the stage
          n_workers: 2          # local cluster size (dask workers / ray CPUs / threads of the thread runner)
          threads_per_worker: 1 # torch/OpenMP threads of each worker's engine
          wave: null            # shards handed out at a time (null: n_workers with a token budget, else all)

    Only CoT generation fans out (one Prefect task per prompt shard, each worker process owning one
    engine); the flow builds the Prefect task runner from this. The runner is not part of any stage key:
    the same config run on threads or on a cluster yields the same artifacts.
    """

    kind: Literal["thread", "dask", "ray"] = "thread"
    address: str | None = None
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    wave: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _address_needs_cluster(self) -> RunnerConfig:
        if self.kind == "thread" and self.address is not None:
            raise ValueError(f"runner.address = {self.address!r}: only a dask or ray runner connects to a cluster")
        return self

    def shards_per_wave(self, has_budget: bool, n_shards: int) -> int:
        """How many shards one wave hands out: `wave`, else n_workers under a token budget, else all."""
        if self.wave is not None:
            return self.wave
        return self.n_workers if has_budget else max(1, n_shards)


@dataclass(frozen=True)
class RunConfig:
    """A validated run config with every stage config constructed (parsed once, by `parse_run_config`)."""

    name: str
    model: str
    prompts: PromptsConfig
    generate: GenerateConfig | None  # None when no calibration needs CoTs
    calibrations: dict[str, CalibConfig]
    jobs: tuple[PruneJob, ...]
    entries: tuple[PruneEntry, ...]  # the `prune:` list the jobs came from (rac.runs.prune_jobs)
    compress: dict[str, Any]  # the `compress` section's canonical dict (CompressConfig fields but `prune`)
    eval: EvalConfig | None
    eval_prompts: PromptsConfig | None  # the eval set (given exactly when `eval` is)
    eval_dense: bool
    report: ReportConfig
    proxies: ProxyConfig | None = None
    eval_pruned: bool | tuple[str, ...] = True  # True: every job, False: none, else these job labels
    runner: RunnerConfig | None = None  # the generation fan-out (None: in-process)
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def canonical(self) -> dict[str, Any]:
        """Every stage config with defaults filled in (JSON-able); parse_run_config(canonical()) == self."""
        extra: dict[str, Any] = {"proxies": self.proxies.canonical()} if self.proxies is not None else {}
        if self.eval_pruned is not True:
            extra["eval_pruned"] = self.eval_pruned if self.eval_pruned is False else list(self.eval_pruned)
        if self.runner is not None:
            extra["runner"] = self.runner.canonical()
        return {
            "name": self.name,
            "model": self.model,
            "prompts": self.prompts.canonical(),
            "generate": self.generate.canonical() if self.generate is not None else None,
            "calibrations": {k: v.canonical() for k, v in self.calibrations.items()},
            "compress": dict(self.compress),
            "prune": _unique([e.canonical() for e in self.entries]),
            "eval": self._eval_canonical(),
            "eval_dense": self.eval_dense,
            "report": self.report.canonical(),
            **extra,
        }

    def _eval_canonical(self) -> dict[str, Any] | None:
        if self.eval is None or self.eval_prompts is None:
            return None
        return {"prompts": self.eval_prompts.canonical(), **self.eval.canonical()}

    def heatmap_calibration(self, job: PruneJob) -> str:
        """Name of the calibration set whose sequences the per-token error heatmap of `job` uses."""
        if self.report.heatmap_calibration is not None:
            return self.report.heatmap_calibration
        rac = [n for n, c in self.calibrations.items() if c.kind == "rac"]
        return rac[0] if rac else job.calibration

    def evaluates(self, job: PruneJob) -> bool:
        """Whether the pruned model of `job` is evaluated (an `eval` section and eval_pruned selects it)."""
        if self.eval is None or self.eval_pruned is False:
            return False
        return self.eval_pruned is True or job.label in self.eval_pruned

    def needs_cots(self) -> bool:
        return any(c.kind == "rac" for c in self.calibrations.values())


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def parse_run_config(data: Any, source: str = "<config>") -> RunConfig:
    """Validate a run-config mapping; raise RunConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise RunConfigError(f"{source}: the run config must be a mapping of keys, got {type(data).__name__}")
    problems: list[str] = []
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {unknown}; known keys: {', '.join(TOP_KEYS)}")
    problems += [f"missing key {k!r}; known keys: {', '.join(TOP_KEYS)}" for k in REQUIRED_KEYS if k not in data]
    name = str(data.get("name", "rac"))
    if not _NAME_RE.match(name):
        problems.append(f"name = {name!r}: must match {_NAME_RE.pattern}")
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        problems.append(f"model = {model!r}: must be a model alias or a folder path")
    prompts = build_section(PromptsConfig, data.get("prompts"), "prompts", problems) if "prompts" in data else None
    calibs = _parse_calibrations(data, problems)
    generate = None
    if any(c.kind == "rac" for c in calibs.values()) or data.get("generate") is not None:
        generate = build_section(GenerateConfig, data.get("generate"), "generate", problems)
    grid = parse_jobs(data, calibs, problems)
    jobs = grid.jobs
    ev, ev_prompts = _parse_eval(data.get("eval"), data.get("prompts"), problems)
    eval_dense = data.get("eval_dense", True)
    if not isinstance(eval_dense, bool):
        problems.append(f"eval_dense = {eval_dense!r}: expected true or false")
    report = build_section(ReportConfig, data.get("report"), "report", problems)
    if report is not None and report.heatmap_calibration not in (None, *calibs):
        problems.append(f"report.heatmap_calibration = {report.heatmap_calibration!r}: not one of the "
                        f"calibrations {sorted(calibs)}")
    eval_pruned = _parse_eval_pruned(data.get("eval_pruned", True), [j.label for j in jobs], problems)
    runner = build_section(RunnerConfig, data["runner"], "runner", problems) if data.get("runner") is not None else None
    proxies = None
    if data.get("proxies") is not None:
        proxies = build_section(ProxyConfig, data.get("proxies"), "proxies", problems)
        if ev is None or not eval_dense:
            problems.append("proxies: scored on the dense model's evaluation CoTs, so they need an `eval` "
                            "section and eval_dense: true")
    if problems or prompts is None or report is None:
        raise RunConfigError(f"{source}: invalid run config:\n  - " + "\n  - ".join(problems))
    return RunConfig(name=name, model=str(model), prompts=prompts, generate=generate, calibrations=calibs,
                     jobs=jobs, entries=grid.entries, compress=grid.compress, eval=ev, eval_prompts=ev_prompts, eval_dense=bool(eval_dense),
                     report=report, proxies=proxies, eval_pruned=eval_pruned, runner=runner, raw=dict(data))


def _parse_calibrations(data: Mapping[str, Any], problems: list[str]) -> dict[str, CalibConfig]:
    raw = data.get("calibrations", {})
    if not isinstance(raw, Mapping) or ("calibrations" in data and not raw):
        problems.append(f"calibrations = {raw!r}: expected a non-empty mapping name -> calibration config")
        return {}
    calibs: dict[str, CalibConfig] = {}
    for cname, cdata in raw.items():
        if not _NAME_RE.match(str(cname)):
            problems.append(f"calibrations.{cname}: name must match {_NAME_RE.pattern}")
        calib = build_section(CalibConfig, cdata, f"calibrations.{cname}", problems)
        if calib is not None:
            calibs[str(cname)] = calib
    return calibs


def _parse_eval_pruned(value: Any, labels: list[str], problems: list[str]) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"eval_pruned = {value!r}: expected true, false or a list of pruned-model labels")
        return True
    unknown = [v for v in value if v not in labels]
    if unknown:
        problems.append(f"eval_pruned: unknown label(s) {unknown}; the pruned models are {labels}")
    return tuple(value)


def _parse_eval(data: Any, calib_prompts: Any, problems: list[str]) -> tuple[EvalConfig | None, PromptsConfig | None]:
    """(EvalConfig, PromptsConfig of the eval set) of an `eval:` mapping, or (None, None)."""
    if data is None:
        return None, None
    if not isinstance(data, Mapping):
        problems.append(f"eval: expected a mapping of keys, got {data!r}")
        return None, None
    fields = dict(data)
    pdata = fields.pop("prompts", None)
    if pdata is None:
        problems.append("missing key 'eval.prompts' (the eval set's PromptsConfig, e.g. holdout: eval)")
        return None, None
    if isinstance(pdata, Mapping) and "template" not in pdata and isinstance(calib_prompts, Mapping):
        if "template" in calib_prompts:  # evaluation uses the calibration template unless told otherwise
            pdata = {**pdata, "template": calib_prompts["template"]}
    prompts = build_section(PromptsConfig, pdata, "eval.prompts", problems)
    known = ", ".join(["prompts", *sorted(EvalConfig.model_fields)])
    n_before = len(problems)
    ev = build_section(EvalConfig, fields, "eval", problems)
    for i in range(n_before, len(problems)):
        problems[i] = re.sub(r"known keys in eval: .*", f"known keys in eval: {known}", problems[i])
    return (ev, prompts) if ev is not None and prompts is not None else (None, None)


def parse_eval_section(data: Any, calib_prompts: Any = None,
                       source: str = "<eval>") -> tuple[EvalConfig, PromptsConfig]:
    """(EvalConfig, eval PromptsConfig) of an `eval:` mapping; RunConfigError listing every problem."""
    problems: list[str] = []
    ev, prompts = _parse_eval(data, calib_prompts, problems)
    if problems or ev is None or prompts is None:
        raise RunConfigError(f"{source}: invalid eval config:\n  - " + "\n  - ".join(problems or ["empty"]))
    return ev, prompts


def read_yaml(path: Path | str, what: str = "run config") -> Any:
    """The parsed YAML of a file; RunConfigError (with line/column for bad YAML) on problems."""
    p = Path(path)
    if not p.is_file():
        raise RunConfigError(f"{what} {str(p)!r} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RunConfigError(f"{p}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise RunConfigError(f"{p}: not a UTF-8 text file ({err})") from None


def load_run_config(path: Path | str) -> RunConfig:
    """Read and validate a YAML run config; RunConfigError listing every problem."""
    return parse_run_config(read_yaml(path), source=str(path))
