"""Nothing a run writes is a pickle, and nothing a run reads is unpickled (issue 17: hostile files).

Reuse is the index's (hash-verified artifact references), so Prefect persists no task results: a crafted
result file in the work dir has nothing that would load it. Checked by running the tiny pipeline with every
unpickling entry point of `pickle` and `cloudpickle` made to raise, then resuming the finished run.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "configs" / "tiny.yaml"
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("something was unpickled during the run")


@pytest.mark.slow
def test_a_run_and_its_resume_unpickle_nothing_and_write_no_pickle(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudpickle
    from prefect.testing.utilities import prefect_test_harness

    from rac.store.index import Index
    from rac_prefect.flows.prune import rac_prune

    work = tmp_path / "work"
    with prefect_test_harness(server_startup_timeout=120):
        for mod in (pickle, cloudpickle):
            monkeypatch.setattr(mod, "loads", _refuse)
            monkeypatch.setattr(mod, "load", _refuse)
        monkeypatch.setattr(pickle, "Unpickler", _refuse)
        first = rac_prune(config_path=str(TINY), run_id="p", work_dir=str(work))
        again = rac_prune(config_path=str(TINY), run_id="p", work_dir=str(work))  # resume of a finished run
    assert Index(work).get_run("p")["status"] == "done"  # type: ignore[index]
    assert not any(v["reused"] for v in first["stages"].values())
    assert again["stages"].keys() == first["stages"].keys() and all(v["reused"] for v in again["stages"].values())
    files = [p for p in work.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.read_bytes()[:2] in PICKLE_MAGIC]
    assert not [p for p in work.rglob("prefect") if p.is_dir()]
    home = Path(os.environ["PREFECT_HOME"])
    stored = [p for p in (home / "storage").rglob("*") if p.is_file()] if (home / "storage").exists() else []
    assert not stored, f"Prefect persisted results: {stored[:3]}"
