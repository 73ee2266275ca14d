"""Stage memoisation: every stage of a run is keyed by its inputs, verified by hash, recorded in the index.

A stage's cache key is the sha256 of (stage name, its config's canonical dict, the sha256 of every input
artifact, the model revision, the rac version). Its outputs live in `<work_dir>/stages/<stage>/<key>/`.
`run_stage` first looks the key up in the index: when a completed stage with that key exists (in any run
of the work dir) and every output still matches its recorded sha256, the outputs are reused and no work
is done. Otherwise the stage is computed under a per-stage file lock; an output whose hash does not match
is recomputed, never trusted. Resumable stages (CoT generation, pruning) keep their partial progress in
the stage folder and the index, and continue from it (see rac.runs.resume).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rac
from rac.config import sha256_json
from rac.runs.workdir import FileLock, RunRef
from rac.store.artifacts import ArtifactRef, sweep_temp
from rac.store.index import Index

# progress(done, total, what): called by long stages (generation shards, pruning steps)
ProgressFn = Callable[[int, int, str], None]
ComputeFn = Callable[[Path], tuple[list[ArtifactRef], dict[str, Any]]]


@dataclass(frozen=True)
class StageOutput:
    """What a stage hands to the next: its cache key, output artifacts and a small summary."""

    name: str
    stage: str
    stage_key: str
    outputs: tuple[ArtifactRef, ...]
    summary: dict[str, Any] = field(default_factory=dict, compare=False)
    reused: bool = False

    def output(self, kind: str) -> ArtifactRef:
        """The output artifact of a given kind (ValueError listing the kinds present)."""
        for ref in self.outputs:
            if ref.kind == kind:
                return ref
        raise ValueError(f"stage {self.name!r} has no {kind!r} output; has {[r.kind for r in self.outputs]}")


def stage_key(stage: str, config: dict[str, Any], inputs: list[ArtifactRef], env: RunRef) -> str:
    """Cache key of a stage: sha256 over (stage, config, input hashes, model revision, rac version)."""
    return sha256_json({"stage": stage, "config": config, "inputs": sorted(r.sha256 for r in inputs),
                        "model": env.model_revision, "rac": rac.__version__})[:20]


def verified(outputs: list[ArtifactRef]) -> list[str]:
    """Problems with a list of artifacts (empty when every one exists with its recorded sha256)."""
    return [p for p in (r.check() for r in outputs) if p is not None]


def find_done(index: Index, key: str, prefer_run: str | None = None,
              prefer_name: str | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """(a completed stage row with key `key` whose outputs all verify, problems seen with others).

    Rows of `prefer_run` come first (its row named `prefer_name` first of all: two stages of one run can share
    a key, e.g. a progressive calibration's first set and the one-shot set), then the newest.
    """
    problems: list[str] = []
    for row in sorted(index.done_stages(key), key=lambda r: (r["run_id"] != prefer_run, r["name"] != prefer_name)):
        bad = verified(row["outputs"])
        if not bad:
            return row, problems
        problems += bad
    return None, problems


def run_stage(env: RunRef, name: str, stage: str, config: dict[str, Any], inputs: list[ArtifactRef],
              compute: ComputeFn, log: Callable[[str], None] = print,
              cleanup: Callable[[], None] | None = None) -> StageOutput:
    """Reuse the verified outputs of a completed stage with the same key, else compute and record them.

    `cleanup` runs after a computed stage is recorded as done (e.g. to delete resume checkpoints).
    """
    index = Index(env.work_dir)
    key = stage_key(stage, config, inputs, env)
    row, problems = find_done(index, key, env.run_id, name)
    for p in problems:
        log(f"[{name}] not trusted, recomputing: {p}")
    if row is None:
        folder = env.stage_dir(stage, key)
        with FileLock(folder.with_name(key + ".lock"), f"stage {stage}/{key}", blocking=True):
            row, _ = find_done(index, key, env.run_id, name)  # another process may have finished it meanwhile
            if row is None:
                out = _compute(env, index, name, stage, key, config, inputs, compute, folder)
                if cleanup is not None:
                    cleanup()
                return out
    mine = row["run_id"] == env.run_id and row["name"] == name  # this run computed it before (a resume)
    if not mine:
        index.stage_started(env.run_id, name, stage, key, config, inputs)
        index.stage_done(env.run_id, name, key, row["outputs"], row["summary"], 0.0, reused=True)
    log(f"[{name}] {'already done' if mine else 'reused'} {stage}/{key} (verified {len(row['outputs'])} artifact(s))")
    return StageOutput(name, stage, key, tuple(row["outputs"]), row["summary"], reused=True)


def _compute(env: RunRef, index: Index, name: str, stage: str, key: str, config: dict[str, Any],
             inputs: list[ArtifactRef], compute: ComputeFn, folder: Path) -> StageOutput:
    for ref in inputs:
        ref.verify()
    index.stage_started(env.run_id, name, stage, key, config, inputs)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temp(folder)
    t0 = time.perf_counter()
    try:
        outputs, summary = compute(folder)
    except BaseException as err:
        index.stage_failed(env.run_id, name, f"{type(err).__name__}: {err}")
        raise
    index.stage_done(env.run_id, name, key, outputs, summary, time.perf_counter() - t0, reused=False)
    return StageOutput(name, stage, key, tuple(outputs), summary, reused=False)
