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
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rac.config import StageConfig
from rac.data.calib import CalibConfig
from rac.data.generate import GenerateConfig
from rac.data.prompts import PromptsConfig
from rac.engine.sequential import CompressConfig
from rac.eval.evaluate import EvalConfig
from rac.eval.proxies import ProxyConfig
from rac.pruners.base import PruneConfig

TOP_KEYS = ("name", "model", "prompts", "generate", "calibrations", "compress", "prune", "eval",
            "eval_dense", "eval_pruned", "report", "proxies", "runner")
REQUIRED_KEYS = ("model", "prompts", "calibrations", "prune")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
C = TypeVar("C", bound=BaseModel)


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
class PruneJob:
    """One pruned model of the grid: a calibration set x a compression config."""

    label: str
    calibration: str
    compress: CompressConfig


@dataclass(frozen=True)
class RunConfig:
    """A validated run config with every stage config constructed (parsed once, by `parse_run_config`)."""

    name: str
    model: str
    prompts: PromptsConfig
    generate: GenerateConfig | None  # None when no calibration needs CoTs
    calibrations: dict[str, CalibConfig]
    jobs: tuple[PruneJob, ...]
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
        first = self.jobs[0].compress.canonical()
        first.pop("prune", None)
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
            "compress": first,
            "prune": _unique([j.compress.prune.canonical() for j in self.jobs]),
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


def _known(cls: type[BaseModel], drop: tuple[str, ...] = ()) -> str:
    return ", ".join(k for k in sorted(cls.model_fields) if k not in drop)


def _build(cls: type[C], data: Any, where: str, problems: list[str], drop: tuple[str, ...] = (),
           extra: Mapping[str, Any] | None = None) -> C | None:
    """cls(**data, **extra), or None with one line per problem appended to `problems`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
        return None
    try:
        return cls(**data, **(extra or {}))
    except ValidationError as err:
        for e in err.errors():
            loc = ".".join(str(x) for x in (where, *e["loc"]))
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown key {loc!r}; known keys in {where}: {_known(cls, drop)}")
            elif e["type"] == "missing":
                problems.append(f"missing key {loc!r}; known keys in {where}: {_known(cls, drop)}")
            else:
                problems.append(f"{loc} = {e.get('input')!r}: {e['msg']}")
    except (ValueError, TypeError) as err:
        problems.append(f"{where}: {err}")
    return None


def prune_label(calib: str, prune: PruneConfig, progressive: bool = False) -> str:
    """E.g. ``rac-sparsegpt-50pct``, ``rac-sparsegpt-2of4-w4g128`` (joint), ``rac-gptq-w4g128`` (quantized only),
    ``rac-sparsegpt-50pct-owl`` (OWL layer sparsities);
    a progressive calibration adds ``-progressive`` unless its name already says so (``rac-progressive-...``)."""
    amount = f"{prune.nm[0]}of{prune.nm[1]}" if prune.nm else f"{round(float(prune.sparsity or 0.0) * 100):d}pct"
    parts = [calib, prune.method] + ([amount] if prune.method != "gptq" else [])
    parts += [prune.quant.label] if prune.quant is not None else []
    parts += [prune.allocation.label] if prune.allocation.label else []  # e.g. owl (uniform: nothing)
    return "-".join(parts + (["progressive"] if progressive and "progressive" not in calib else []))


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
    prompts = _build(PromptsConfig, data.get("prompts"), "prompts", problems) if "prompts" in data else None
    calibs = _parse_calibrations(data, problems)
    generate = None
    if any(c.kind == "rac" for c in calibs.values()) or data.get("generate") is not None:
        generate = _build(GenerateConfig, data.get("generate"), "generate", problems)
    jobs = _parse_jobs(data, calibs, problems)
    ev, ev_prompts = _parse_eval(data.get("eval"), data.get("prompts"), problems)
    eval_dense = data.get("eval_dense", True)
    if not isinstance(eval_dense, bool):
        problems.append(f"eval_dense = {eval_dense!r}: expected true or false")
    report = _build(ReportConfig, data.get("report"), "report", problems)
    if report is not None and report.heatmap_calibration not in (None, *calibs):
        problems.append(f"report.heatmap_calibration = {report.heatmap_calibration!r}: not one of the "
                        f"calibrations {sorted(calibs)}")
    eval_pruned = _parse_eval_pruned(data.get("eval_pruned", True), [j.label for j in jobs], problems)
    runner = _build(RunnerConfig, data["runner"], "runner", problems) if data.get("runner") is not None else None
    proxies = None
    if data.get("proxies") is not None:
        proxies = _build(ProxyConfig, data.get("proxies"), "proxies", problems)
        if ev is None or not eval_dense:
            problems.append("proxies: scored on the dense model's evaluation CoTs, so they need an `eval` "
                            "section and eval_dense: true")
    if problems or prompts is None or report is None:
        raise RunConfigError(f"{source}: invalid run config:\n  - " + "\n  - ".join(problems))
    return RunConfig(name=name, model=str(model), prompts=prompts, generate=generate, calibrations=calibs,
                     jobs=tuple(jobs), eval=ev, eval_prompts=ev_prompts, eval_dense=bool(eval_dense),
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
        calib = _build(CalibConfig, cdata, f"calibrations.{cname}", problems)
        if calib is not None:
            calibs[str(cname)] = calib
    return calibs


def _parse_jobs(data: Mapping[str, Any], calibs: dict[str, CalibConfig], problems: list[str]) -> list[PruneJob]:
    """Every calibration x every prune entry, each with the one `compress` section (checked once)."""
    raw_prunes = data.get("prune", [])
    if isinstance(raw_prunes, Mapping):
        raw_prunes = [raw_prunes]
    if not isinstance(raw_prunes, list) or ("prune" in data and not raw_prunes):
        problems.append(f"prune = {raw_prunes!r}: expected a non-empty list of prune configs")
        return []
    compress = data.get("compress") or {}
    if not isinstance(compress, Mapping):
        problems.append(f"compress: expected a mapping of keys, got {compress!r}")
        return []
    if "prune" in compress:
        problems.append("compress.prune: give pruning settings in the top-level `prune` list instead")
        return []
    prunes = [_build(PruneConfig, pdata, f"prune[{i}]", problems) for i, pdata in enumerate(raw_prunes)]
    valid = [p for p in prunes if p is not None]
    if not valid:
        return []
    n_before = len(problems)
    first = _build(CompressConfig, compress, "compress", problems, drop=("prune",), extra={"prune": valid[0]})
    if first is None or len(problems) > n_before:
        return []
    for i, p in enumerate(prunes):
        for cname, calib in calibs.items():
            why = calib.progressive.refuses(p.method, p.sparsity) if p is not None and calib.progressive else None
            if p is not None and calib.progressive is not None and why is not None:
                problems.append(f"calibrations.{cname}.progressive.steps = {list(calib.progressive.steps)} "
                                f"with prune[{i}] ({prune_label(cname, p, True)}): {why}")
    jobs = [PruneJob(prune_label(cname, p, c.progressive is not None), cname, first.model_copy(update={"prune": p}))
            for p in valid for cname, c in calibs.items()]
    labels = [j.label for j in jobs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        problems.append(f"prune: duplicate entries {dupes}")
    return jobs


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
    prompts = _build(PromptsConfig, pdata, "eval.prompts", problems)
    known = ", ".join(["prompts", *sorted(EvalConfig.model_fields)])
    n_before = len(problems)
    ev = _build(EvalConfig, fields, "eval", problems)
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
