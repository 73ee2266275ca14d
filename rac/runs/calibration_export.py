"""Find a run's calibration set in the index, for `rac export-calibration RUN NAME DEST`.

`calibration_of_run(work_dir, run_id, name)` is the calibration Parquet of the run's completed stage
`calib/<name>` (its `calibration` output), after re-hashing it against the sha256 the index recorded;
`export_run_calibration` hands that file to `rac.data.calib_export.export_calibration`.
"""

from __future__ import annotations

import json
from pathlib import Path

from rac.data.calib_export import ExportedCalibration, export_calibration
from rac.store.artifacts import ArtifactError, ArtifactRef
from rac.store.index import Index

PREFIX = "calib/"


class CalibrationNotFoundError(ValueError):
    """No such run, or the run has no completed calibration set of that name."""


def calibration_of_run(work_dir: Path | str, run_id: str, name: str) -> Path:
    """The verified calibration Parquet of calibration set `name` of run `run_id` in `work_dir`.

    Unknown run or name: CalibrationNotFoundError listing the known ones; a file whose content no longer
    matches the index: ArtifactError naming it (and `rac verify`)."""
    index = Index(work_dir)
    if not index.path.exists():
        raise FileNotFoundError(f"no index at {str(index.path)!r}: no run has been started in this work dir")
    if index.get_run(run_id) is None:
        known = [r["run_id"] for r in index.list_runs()]
        raise CalibrationNotFoundError(f"no run {run_id!r} in {index.path}; known runs: {known}")
    _, rows = index.query("SELECT name, status, outputs FROM stages WHERE run_id = ? AND starts_with(name, ?) "
                          "ORDER BY name", [run_id, PREFIX])
    found = {str(n)[len(PREFIX):]: (str(status), outputs) for n, status, outputs in rows}
    done = sorted(k for k, (status, _) in found.items() if status == "done")
    if name not in found or found[name][0] != "done":
        state = f" (its stage is {found[name][0]!r})" if name in found else ""
        raise CalibrationNotFoundError(f"run {run_id!r} has no completed calibration set {name!r}{state}; "
                                       f"known: {done}")
    refs = [ArtifactRef.from_json(o) for o in json.loads(found[name][1] or "[]")]
    ref = next((r for r in refs if r.kind == "calibration"), None)
    if ref is None:
        raise CalibrationNotFoundError(f"stage {PREFIX}{name} of run {run_id!r} recorded no calibration output")
    problem = ref.check()
    if problem is not None:
        raise ArtifactError(f"calibration {name!r} of run {run_id!r} ({ref.path}) changed since the run recorded "
                            f"it: {problem}; `rac verify {run_id}` lists what else changed, the next run "
                            f"recomputes it")
    return ref.path


def export_run_calibration(work_dir: Path | str, run_id: str, name: str, dest: Path) -> ExportedCalibration:
    """calibration_of_run, then export_calibration to `dest`."""
    return export_calibration(calibration_of_run(work_dir, run_id, name), Path(dest))
