"""`rac verify`: re-hash every artifact the index vouches for and list what no longer matches.

A stage's outputs are trusted only while their sha256 matches what the index recorded when the stage
finished (`rac.store.artifacts.ArtifactRef.check`); a run reuses nothing that fails that check, but a
corrupted file is otherwise only found by the next run. `verify_work_dir` checks every completed stage of
a work dir (or of one run) now: each output once, however many runs reused it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rac.store.artifacts import ArtifactRef
from rac.store.index import Index


@dataclass(frozen=True)
class Mismatch:
    """A recorded output that is missing or whose content changed."""

    run_id: str
    step: str  # the stage step that recorded it, e.g. prune/rac-sparsegpt-50pct
    stage_key: str
    uri: str
    problem: str


@dataclass(frozen=True)
class VerifyReport:
    """What was checked and what failed."""

    n_stages: int
    n_artifacts: int
    mismatches: tuple[Mismatch, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def verify_work_dir(work_dir: Path | str, run_id: str | None = None) -> VerifyReport:
    """Check every output of the completed stages of `run_id` (None: every run) against its recorded sha256."""
    index = Index(work_dir)
    if not index.path.exists():
        raise FileNotFoundError(f"no index at {str(index.path)!r}: no run has been started in this work dir")
    if run_id is not None and index.get_run(run_id) is None:
        known = [r["run_id"] for r in index.list_runs()]
        raise ValueError(f"no run {run_id!r} in {index.path}; known runs: {known}")
    where, params = ("AND run_id = ?", [run_id]) if run_id is not None else ("", [])
    _, rows = index.query(f"SELECT run_id, name, stage_key, outputs FROM stages WHERE status = 'done' {where} "
                          "ORDER BY run_id, started", params)
    checked: dict[tuple[str, str], str | None] = {}  # (uri, sha256) -> problem, each file hashed once
    mismatches: list[Mismatch] = []
    for rid, step, key, outputs in rows:
        for ref in (ArtifactRef.from_json(o) for o in json.loads(outputs or "[]")):
            if (ref.uri, ref.sha256) not in checked:
                checked[(ref.uri, ref.sha256)] = ref.check()
            problem = checked[(ref.uri, ref.sha256)]
            if problem is not None:
                mismatches.append(Mismatch(rid, step, key, ref.uri, problem))
    return VerifyReport(len(rows), len(checked), tuple(mismatches))
