"""Opening and closing a run: validation, the fingerprint guard, the per-run lock and the run row.

A run is bound to a fingerprint: the dense model's revision (`rac.models.streaming.model_revision`), the
hash of its canonical config and the rac version. Resuming with anything else is refused, naming what
differs. `precheck` does every check without writing anything (the CLI calls it before starting Prefect, so
bad input never leaves a half-made run row); `RunSession.open` repeats the checks under the run lock and
then creates (or resumes) the run row. Every flow opens its run through `RunSession`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rac
from rac.config import sha256_json
from rac.models.streaming import model_revision
from rac.runs.workdir import FileLock, RunRef, WorkDir, check_run_id, crashpoint
from rac.store.artifacts import atomic_write_json
from rac.store.index import Index


class UnknownRunError(ValueError):
    """A run id that the work dir's index does not know."""


class FingerprintMismatchError(ValueError):
    """Resuming a run with a different model, config or rac version than it was started with."""


def fingerprint(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What a run is bound to: model revision, canonical config (hash) and rac version. A model from the
    Hugging Face hub cache (a `models--owner--name/snapshots/<commit>` folder) also records
    `model: owner/name@commit`, `model_repo` and `model_commit` (the revision still names the weights)."""
    from rac.models.hub import hub_snapshot_of

    resolved = Path(model_dir).resolve()
    fp: dict[str, Any] = {
        "model_dir": str(resolved),
        "model_revision": model_revision(model_dir),
        "config_hash": sha256_json(config),
        "rac_version": rac.__version__,
        "calibrations": {},
    }
    snapshot = hub_snapshot_of(resolved)
    if snapshot is not None:
        repo_id, commit = snapshot
        fp.update(model=f"{repo_id}@{commit}", model_repo=repo_id, model_commit=commit)
    return fp


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines `key: old -> new` for every dotted key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_fingerprint(run_id: str, stored: dict[str, Any], stored_config: dict[str, Any],
                      current: dict[str, Any], current_config: dict[str, Any]) -> None:
    """Raise FingerprintMismatchError listing what differs between a run's stored and current binding."""
    problems = []
    if stored["model_revision"] != current["model_revision"]:
        problems.append(
            f"model revision differs: {stored['model_revision'][:12]} ({stored['model_dir']}) -> "
            f"{current['model_revision'][:12]} ({current['model_dir']})"
        )
    if stored["rac_version"] != current["rac_version"]:
        problems.append(f"rac version differs: {stored['rac_version']} -> {current['rac_version']}")
    if stored["config_hash"] != current["config_hash"]:
        lines = config_diff(stored_config, current_config)
        problems.append("config differs: " + "; ".join(lines) if lines else "config differs")
    if problems:
        raise FingerprintMismatchError(
            f"refusing to resume run {run_id!r}: " + " | ".join(problems)
            + " (start a new run id to use the new model/config)"
        )


def resolve_model_dir(model: str) -> Path:
    """The dense model folder of a model alias, path or hub id (`owner/name[@revision]`, resolved through
    huggingface_hub into its cache, as the environment's HF_HUB_OFFLINE / HF_ENDPOINT / HF_HOME say);
    FileNotFoundError/ValueError when missing. `fingerprint` reads a hub model's repo and commit back from
    the snapshot folder's path."""
    from rac.models.assets import resolve_model_ref

    return Path(resolve_model_ref(model).path).resolve()


@dataclass
class Prepared:
    """A validated run that can be opened: its ref, config, fingerprint and the row it resumes (if any)."""

    run: RunRef
    name: str
    config: dict[str, Any]  # the canonical run config the fingerprint hashes
    fingerprint: dict[str, Any]
    existing: dict[str, Any] | None
    config_path: str = ""
    lock: FileLock | None = field(default=None, repr=False)


def precheck(work_dir: Path | str, run_id: str, name: str, model: str, config: dict[str, Any],
             config_path: str = "", resume_only: bool = False, check_lock: bool = True) -> Prepared:
    """Validate a run before anything is written: model, fingerprint vs an existing run, the lock."""
    check_run_id(run_id)
    model_dir = resolve_model_dir(model)
    fp = fingerprint(model_dir, config)
    index = Index(work_dir)
    existing = index.get_run(run_id)
    if existing is None and resume_only:
        known = [r["run_id"] for r in index.list_runs()]
        raise UnknownRunError(f"no run {run_id!r} in {index.path}; known runs: {known}")
    if existing is not None:
        check_fingerprint(run_id, existing["fingerprint"], existing["config"], fp, config)
    run = RunRef(str(Path(work_dir).resolve()), run_id, str(model_dir), fp["model_revision"])
    lock_file = WorkDir(Path(run.work_dir)).lock_file(run_id)
    if check_lock and lock_file.exists():
        FileLock(lock_file, f"run {run_id!r}").acquire().release()  # raises RunLockedError naming the holder
    return Prepared(run, name, config, fp, existing, config_path)


def register(prepared: Prepared) -> None:
    """Write the run row of a new run with status 'starting', before the flow (and Prefect) starts, so
    `rac resume RUN` works from the first second even if the process dies during start-up."""
    if prepared.existing is None:
        Index(prepared.run.work_dir).create_run(prepared.run.run_id, prepared.name, prepared.config,
                                                prepared.fingerprint, prepared.config_path, os.getpid(),
                                                status="starting")


def stored_run(work_dir: Path | str, run_id: str) -> tuple[dict[str, Any], str]:
    """The canonical config (and config path) a run was started with, for `rac resume`."""
    index = Index(work_dir)
    row = index.get_run(check_run_id(run_id))
    if row is None:
        known = [r["run_id"] for r in index.list_runs()]
        raise UnknownRunError(f"no run {run_id!r} in {index.path}; known runs: {known}")
    return row["config"], row["config_path"] or ""


class RunSession:
    """An open run: holds the run lock until `close`; a crash leaves its row 'running' with a free lock,
    which `rac status` reports as interrupted."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.run = prepared.run
        self.index = Index(self.run.work_dir)

    @classmethod
    def open(cls, work_dir: Path | str, run_id: str, name: str, model: str, config: dict[str, Any],
             config_path: str = "") -> RunSession:
        """Take the run lock, re-check the fingerprint under it, create or resume the run row."""
        lock_file = WorkDir(Path(work_dir).resolve()).lock_file(check_run_id(run_id))
        lock = FileLock(lock_file, f"run {run_id!r}").acquire()
        try:
            prepared = precheck(work_dir, run_id, name, model, config, config_path, check_lock=False)
        except BaseException:
            lock.release()
            raise
        prepared.lock = lock
        session = cls(prepared)
        if prepared.existing is None:
            session.index.create_run(run_id, name, config, prepared.fingerprint, config_path, os.getpid())
        else:
            fp = {**prepared.existing["fingerprint"], "model_dir": prepared.fingerprint["model_dir"]}
            message = None if prepared.existing["status"] == "starting" else "resumed"
            session.index.set_run(run_id, "running", message=message, pid=os.getpid(), fingerprint=fp)
        atomic_write_json(WorkDir(Path(session.run.work_dir)).run_dir(run_id) / "run.json", {
            "run_id": run_id, "config_path": config_path, "config": config, "fingerprint": prepared.fingerprint,
        })
        crashpoint("run.opened")
        return session

    def note_calibration(self, name: str, sha256: str) -> str | None:
        """Record a calibration's sha256 in the run fingerprint; returns a note if it changed."""
        row = self.index.get_run(self.run.run_id)
        fp = dict(row["fingerprint"]) if row else {}
        calibs = dict(fp.get("calibrations", {}))
        old = calibs.get(name)
        calibs[name] = sha256
        self.index.set_run(self.run.run_id, "running", fingerprint={**fp, "calibrations": calibs})
        if old is not None and old != sha256:
            return (f"calibration {name!r} changed since the run started ({old[:12]} -> {sha256[:12]}); "
                    "its pruning restarts from scratch (checkpoints are keyed by the calibration hash)")
        return None

    def close(self, status: str, message: str | None = None) -> None:
        """Write the final status and release the run lock."""
        try:
            self.index.set_run(self.run.run_id, status, message=message)
        finally:
            if self.prepared.lock is not None:
                self.prepared.lock.release()
                self.prepared.lock = None
