"""Opening and closing a run: validation, the per-run lock, the fingerprint guard and the run row.

`precheck` does every check without writing anything (the CLI calls it before starting Prefect, so bad
input never leaves a half-made run row); `RunSession.open` repeats the checks under the run lock and then
creates (or resumes) the run row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rac.artifacts import atomic_write_json
from rac.index import Index
from rac.pipeline import RunEnv
from rac.run import FileLock, RunHandle, check_fingerprint, check_run_id, crashpoint, fingerprint
from rac.runconfig import RunConfig, parse_run_config


class UnknownRunError(ValueError):
    """A run id that the work dir's index does not know."""


def resolve_model_dir(cfg: RunConfig) -> Path:
    """The dense model folder of a run config (alias or path); FileNotFoundError/ValueError when missing."""
    from rac.models.assets import resolve_model

    return Path(resolve_model(cfg.model)).resolve()


@dataclass
class Prepared:
    """A validated run that can be opened: its env, fingerprint and whether it resumes an existing row."""

    env: RunEnv
    cfg: RunConfig
    fingerprint: dict[str, Any]
    existing: dict[str, Any] | None
    config_path: str = ""
    lock: FileLock | None = field(default=None, repr=False)


def precheck(work_dir: Path | str, run_id: str, cfg: RunConfig, config_path: str = "",
             resume_only: bool = False, check_lock: bool = True) -> Prepared:
    """Validate a run before anything is written: model, fingerprint vs an existing run, the lock."""
    check_run_id(run_id)
    model_dir = resolve_model_dir(cfg)
    fp = fingerprint(model_dir, cfg.canonical())
    index = Index(work_dir)
    existing = index.get_run(run_id)
    if existing is None and resume_only:
        known = [r["run_id"] for r in index.list_runs()]
        raise UnknownRunError(f"no run {run_id!r} in {index.path}; known runs: {known}")
    if existing is not None:
        check_fingerprint(run_id, existing["fingerprint"], existing["config"], fp, cfg.canonical())
    env = RunEnv(str(Path(work_dir).resolve()), run_id, str(model_dir), fp["model_revision"])
    lock = FileLock(env.lock_file, f"run {run_id!r}")
    if check_lock and env.lock_file.exists():
        lock.acquire().release()  # raises RunLockedError naming the holder
    return Prepared(env, cfg, fp, existing, config_path)


def stored_config(work_dir: Path | str, run_id: str) -> tuple[RunConfig, str]:
    """The config (and config path) a run was started with, for `rac resume`."""
    index = Index(work_dir)
    row = index.get_run(check_run_id(run_id))
    if row is None:
        known = [r["run_id"] for r in index.list_runs()]
        raise UnknownRunError(f"no run {run_id!r} in {index.path}; known runs: {known}")
    return parse_run_config(row["config"], source=f"run {run_id}"), row["config_path"] or ""


class RunSession:
    """An open run: holds the run lock until `close`."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.env = prepared.env
        self.index = Index(self.env.work_dir)

    @classmethod
    def open(cls, work_dir: Path | str, run_id: str, cfg: RunConfig, config_path: str = "") -> RunSession:
        """Take the run lock, re-check the fingerprint under it, create or resume the run row."""
        handle = RunHandle(str(Path(work_dir).resolve()), check_run_id(run_id))
        lock = FileLock(handle.lock_file, f"run {run_id!r}").acquire()
        try:
            prepared = precheck(work_dir, run_id, cfg, config_path, check_lock=False)
        except BaseException:
            lock.release()
            raise
        prepared.lock = lock
        session = cls(prepared)
        if prepared.existing is None:
            session.index.create_run(run_id, cfg.name, cfg.canonical(), prepared.fingerprint, config_path,
                                     os.getpid())
        else:
            fp = {**prepared.existing["fingerprint"], "model_dir": prepared.fingerprint["model_dir"]}
            session.index.set_run(run_id, "running", message="resumed", pid=os.getpid(), fingerprint=fp)
        atomic_write_json(session.env.run_dir / "run.json", {
            "run_id": run_id, "config_path": config_path, "config": cfg.canonical(),
            "fingerprint": prepared.fingerprint,
        })
        crashpoint("run.opened")
        return session

    def note_calibration(self, name: str, sha256: str) -> str | None:
        """Record a calibration's sha256 in the run fingerprint; returns a note if it changed."""
        row = self.index.get_run(self.env.run_id)
        fp = dict(row["fingerprint"]) if row else {}
        calibs = dict(fp.get("calibrations", {}))
        old = calibs.get(name)
        calibs[name] = sha256
        self.index.set_run(self.env.run_id, "running", fingerprint={**fp, "calibrations": calibs})
        if old is not None and old != sha256:
            return (f"calibration {name!r} changed since the run started ({old[:12]} -> {sha256[:12]}); "
                    "its pruning restarts from scratch (checkpoints are keyed by the calibration hash)")
        return None

    def close(self, status: str, message: str | None = None) -> None:
        """Write the final status and release the run lock."""
        try:
            self.index.set_run(self.env.run_id, status, message=message)
        finally:
            if self.prepared.lock is not None:
                self.prepared.lock.release()
                self.prepared.lock = None
