"""The work dir: its layout, run ids, the run a task works on (`RunRef`), per-run and per-stage locks, crash points.

Work-dir layout:
    <work_dir>/rac.duckdb                     the index (see rac.store.index)
    <work_dir>/stages/<stage>/<key>/...       stage outputs, content-addressed by the stage cache key,
                                              shared by every run of the work dir (CoTs reused across runs)
    <work_dir>/stages/<stage>/<key>.lock      held while a process computes that stage
    <work_dir>/runs/<run_id>/run.lock         held (flock) by the process running the run; holds its pid
    <work_dir>/runs/<run_id>/run.json         config + fingerprint (a copy of the index row, for humans)
    <work_dir>/runs/<run_id>/report/          report.md + PNGs
    <work_dir>/inputs/prompts-<sha>.jsonl     prompts given to the Python API in memory (content-named)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

CRASH_ENV = "RAC_CRASH_AT"
PAUSE_ENV = "RAC_PAUSE_AT"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class RunLockedError(RuntimeError):
    """Another process holds the run (or stage) lock."""


@dataclass(frozen=True)
class RunRef:
    """What stages and tasks get to find a run: the work dir, the run id and the resolved dense model
    (plain strings, cheap to pass between processes). The model fields are empty where no model is needed
    (a report, a lock probe)."""

    work_dir: str
    run_id: str
    model_dir: str = ""
    model_revision: str = ""

    @property
    def layout(self) -> WorkDir:
        return WorkDir(Path(self.work_dir))

    @property
    def run_dir(self) -> Path:
        return self.layout.run_dir(self.run_id)

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.layout.stage_dir(stage, key)


@dataclass(frozen=True)
class WorkDir:
    """Paths of a work dir (see the module docstring); nothing is created here."""

    root: Path

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def lock_file(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "run.lock"

    def report_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "report"


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it is a safe folder name, else raise ValueError naming it."""
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r} must match {_RUN_ID_RE.pattern} (letters, digits, . _ -)")
    return run_id


def new_run_id(name: str) -> str:
    """`<name>-<yyyymmdd-hhmmss>-<4 hex>`; the name is reduced to safe characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "run"
    return f"{safe[:40]}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class FileLock:
    """An exclusive `fcntl.flock` on a file that also records the holder's pid and start time.

    `blocking=False` raises RunLockedError (naming the holder) when another process holds it.
    The lock file itself is never deleted (deleting lock files races with new holders).
    """

    def __init__(self, path: Path, what: str, blocking: bool = False) -> None:
        self.path = Path(path)
        self.what = what
        self.blocking = blocking
        self._fh: IO[str] | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            info = {}
        if not info:
            return "unknown holder"
        return f"pid {info.get('pid')} since {info.get('since')}"

    def is_held(self) -> bool:
        """Whether another process holds the lock now (a read-only probe: nothing is written)."""
        if not self.path.is_file():
            return False
        with open(self.path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            raise RunLockedError(
                f"{self.what} is already running ({self.holder()}; lock {self.path}); "
                "wait for it to finish or stop that process first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def crashpoint(name: str) -> None:
    """Test aid at a named point: SIGKILL this process when `name` is listed in $RAC_CRASH_AT
    (comma-separated), or sleep S seconds when $RAC_PAUSE_AT lists `name=S`."""
    wanted = os.environ.get(CRASH_ENV, "")
    if wanted and name in {w.strip() for w in wanted.split(",")}:
        os.kill(os.getpid(), signal.SIGKILL)
    for item in os.environ.get(PAUSE_ENV, "").split(","):
        point, _, seconds = item.strip().partition("=")
        if point == name:
            time.sleep(float(seconds or 1))
