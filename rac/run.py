"""Prefect-free run plumbing: work-dir layout, run ids, per-run and per-stage locks, fingerprints, crash points.

Work-dir layout:
    <work_dir>/rac.duckdb                     the index (see rac.index)
    <work_dir>/stages/<stage>/<key>/...       stage outputs, content-addressed by the stage cache key,
                                              shared by every run of the work dir (CoTs reused across runs)
    <work_dir>/stages/<stage>/<key>.lock      held while a process computes that stage
    <work_dir>/runs/<run_id>/run.lock         held (flock) by the process running the run; holds its pid
    <work_dir>/runs/<run_id>/run.json         config + fingerprint (a copy of the index row, for humans)
    <work_dir>/runs/<run_id>/prefect/         Prefect task results (cache records)
    <work_dir>/runs/<run_id>/report/          report.md + PNGs
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import rac

CRASH_ENV = "RAC_CRASH_AT"
PAUSE_ENV = "RAC_PAUSE_AT"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class RunLockedError(RuntimeError):
    """Another process holds the run (or stage) lock."""


class FingerprintMismatchError(ValueError):
    """Resuming a run with a different model, config or rac version than it was started with."""


@dataclass(frozen=True)
class RunHandle:
    """What tasks get to find a run: the work dir and the run id (plain strings, cheap to pass)."""

    work_dir: str
    run_id: str

    @property
    def root(self) -> Path:
        return Path(self.work_dir)

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.run_id

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "run.lock"

    @property
    def report_dir(self) -> Path:
        return self.run_dir / "report"

    @property
    def prefect_dir(self) -> Path:
        return self.run_dir / "prefect"

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key


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


def _safetensors_header(path: Path) -> bytes:
    """The 8-byte length prefix plus the JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"safetensors file {str(path)!r} is truncated (no header)")
        (n,) = struct.unpack("<Q", raw)
        return raw + fh.read(n)


def model_revision(model_dir: Path) -> str:
    """sha256 naming a model folder's revision: config.json + weights index (or safetensors headers + sizes)."""
    root = Path(model_dir)
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model folder {str(root)!r} has no config.json")
    digest = hashlib.sha256(b"config\0" + config.read_bytes())
    index = root / "model.safetensors.index.json"
    if index.is_file():
        digest.update(b"index\0" + index.read_bytes())
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"model folder {str(root)!r} has no *.safetensors weights")
    for shard in shards:
        digest.update(f"{shard.name}\0{shard.stat().st_size}\0".encode() + _safetensors_header(shard))
    return digest.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a canonical JSON config (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What a run is bound to: model revision, canonical config (hash) and rac version."""
    return {
        "model_dir": str(Path(model_dir).resolve()),
        "model_revision": model_revision(model_dir),
        "config_hash": config_hash(config),
        "rac_version": rac.__version__,
        "calibrations": {},
    }


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
