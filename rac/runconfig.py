"""The YAML run config: one file composing every stage config of a `rac run`.

    name: demo                      # run name (run ids are <name>-<time>-<hex> unless --run-id)
    model: smollm2-135m             # alias (rac.models.assets.ALIASES) or a local HF folder
    prompts:   {...}                # rac.data PromptsConfig: calibration prompts
    generate:  {...}                # rac.data GenerateConfig: on-policy CoTs (only if a `rac` calibration)
    calibrations:                   # name -> rac.data CalibConfig; all share the prompts and CoTs
      prompt: {kind: prompt, ...}
      rac:    {kind: rac, ...}
    compress:  {...}                # rac.engine CompressConfig fields except `prune`
    prune:                          # list of rac.pruners PruneConfig; every calibration x every entry
      - {method: sparsegpt, sparsity: 0.5}
    eval:      {...}                # rac.eval EvalConfig, or omitted (no evaluation)
    eval_dense: true                # also evaluate the dense model
    report:    {...}                # ReportConfig below

Validation collects every problem (unknown keys listed with the known ones, bad values named with their
dotted path) into one RunConfigError (a ValueError). Nothing is resolved or written while parsing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rac.config import StageConfig

TOP_KEYS = ("name", "model", "prompts", "generate", "calibrations", "compress", "prune", "eval",
            "eval_dense", "report")
REQUIRED_KEYS = ("model", "prompts", "calibrations", "prune")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


class RunConfigError(ValueError):
    """A run config that cannot be used; the message lists every problem found."""


class ReportConfig(StageConfig):
    """What `rac report` draws: the metrics table/plots and the per-token reconstruction-error heatmap."""

    heatmap: bool = True
    heatmap_sequences: int = 2
    heatmap_max_tokens: int = 256


@dataclass(frozen=True)
class PruneJob:
    """One pruned model of the grid: a calibration set x a compression config."""

    label: str
    calibration: str
    compress: Any  # CompressConfig


@dataclass(frozen=True)
class RunConfig:
    """A validated run config with every stage config constructed."""

    name: str
    model: str
    prompts: Any  # PromptsConfig
    generate: Any | None  # GenerateConfig (None when no calibration needs CoTs)
    calibrations: dict[str, Any]  # name -> CalibConfig
    jobs: tuple[PruneJob, ...]
    eval: Any | None  # EvalConfig
    eval_dense: bool
    report: ReportConfig
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def canonical(self) -> dict[str, Any]:
        """Every stage config with defaults filled in (JSON-able); parse_run_config(canonical()) == self."""
        first = self.jobs[0].compress.canonical()
        first.pop("prune", None)
        return {
            "name": self.name,
            "model": self.model,
            "prompts": self.prompts.canonical(),
            "generate": self.generate.canonical() if self.generate is not None else None,
            "calibrations": {k: v.canonical() for k, v in self.calibrations.items()},
            "compress": first,
            "prune": _unique([j.compress.prune.canonical() for j in self.jobs]),
            "eval": self.eval.canonical() if self.eval is not None else None,
            "eval_dense": self.eval_dense,
            "report": self.report.canonical(),
        }

    def needs_cots(self) -> bool:
        return any(_calib_kind(c) == "rac" for c in self.calibrations.values())


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _calib_kind(cfg: Any) -> str:
    return str(getattr(cfg, "kind", ""))


def stage_classes() -> dict[str, type[StageConfig]]:
    """The stage config classes of the library, by run-config section."""
    from rac.data import CalibConfig, GenerateConfig, PromptsConfig
    from rac.engine import CompressConfig
    from rac.eval import EvalConfig
    from rac.pruners import PruneConfig

    return {"prompts": PromptsConfig, "generate": GenerateConfig, "calibrations": CalibConfig,
            "compress": CompressConfig, "prune": PruneConfig, "eval": EvalConfig, "report": ReportConfig}


def _known(cls: type[BaseModel], drop: tuple[str, ...] = ()) -> str:
    return ", ".join(k for k in sorted(cls.model_fields) if k not in drop)


def _build(cls: type[BaseModel], data: Any, where: str, problems: list[str],
           drop: tuple[str, ...] = ()) -> Any:
    """cls(**data), or None with one line per problem appended to `problems`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
        return None
    try:
        return cls(**data)
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


def _check_pruner(method: str, where: str, problems: list[str]) -> None:
    from rac.pruners import get_pruner

    try:
        get_pruner(method)
    except (ValueError, KeyError) as err:
        problems.append(f"{where}.method = {method!r}: {err}")


def _prune_label(calib: str, prune: Any) -> str:
    nm = getattr(prune, "nm", None)
    amount = f"{nm[0]}of{nm[1]}" if nm else f"{round(float(prune.sparsity) * 100):d}pct"
    return f"{calib}-{prune.method}-{amount}"


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
    classes = stage_classes()
    prompts = _build(classes["prompts"], data.get("prompts"), "prompts", problems) if "prompts" in data else None
    calibs: dict[str, Any] = {}
    raw_calibs = data.get("calibrations", {})
    if not isinstance(raw_calibs, Mapping) or ("calibrations" in data and not raw_calibs):
        problems.append(f"calibrations = {raw_calibs!r}: expected a non-empty mapping name -> calibration config")
        raw_calibs = {}
    for cname, cdata in raw_calibs.items():
        if not _NAME_RE.match(str(cname)):
            problems.append(f"calibrations.{cname}: name must match {_NAME_RE.pattern}")
        calibs[str(cname)] = _build(classes["calibrations"], cdata, f"calibrations.{cname}", problems)
    needs_cots = any(c is not None and _calib_kind(c) == "rac" for c in calibs.values())
    generate = None
    if needs_cots or data.get("generate") is not None:
        generate = _build(classes["generate"], data.get("generate"), "generate", problems)
    jobs = _parse_jobs(data, classes, calibs, problems)
    ev = _build(classes["eval"], data["eval"], "eval", problems) if data.get("eval") is not None else None
    eval_dense = data.get("eval_dense", True)
    if not isinstance(eval_dense, bool):
        problems.append(f"eval_dense = {eval_dense!r}: expected true or false")
    report = _build(ReportConfig, data.get("report"), "report", problems)
    if problems:
        raise RunConfigError(f"{source}: invalid run config:\n  - " + "\n  - ".join(problems))
    return RunConfig(name=name, model=str(model), prompts=prompts, generate=generate, calibrations=calibs,
                     jobs=tuple(jobs), eval=ev, eval_dense=bool(eval_dense), report=report, raw=dict(data))


def _parse_jobs(data: Mapping[str, Any], classes: dict[str, type[StageConfig]], calibs: dict[str, Any],
                problems: list[str]) -> list[PruneJob]:
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
    jobs: list[PruneJob] = []
    for i, pdata in enumerate(raw_prunes):
        prune = _build(classes["prune"], pdata, f"prune[{i}]", problems)
        if prune is None:
            continue
        _check_pruner(str(prune.method), f"prune[{i}]", problems)
        ccfg = _build(classes["compress"], {**compress, "prune": prune}, "compress", problems, drop=("prune",))
        if ccfg is None:
            return []
        for cname in calibs:
            jobs.append(PruneJob(_prune_label(cname, prune), cname, ccfg))
    labels = [j.label for j in jobs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        problems.append(f"prune: duplicate entries {dupes}")
    return jobs


def load_run_config(path: Path | str) -> RunConfig:
    """Read and validate a YAML run config; RunConfigError (with line/column for bad YAML) on problems."""
    p = Path(path)
    if not p.is_file():
        raise RunConfigError(f"run config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RunConfigError(f"{p}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise RunConfigError(f"{p}: not a UTF-8 text file ({err})") from None
    return parse_run_config(data, source=str(p))
