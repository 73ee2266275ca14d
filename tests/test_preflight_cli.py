"""`rac run` on bad data or a bad model folder: exit 2, one line naming the value, no traceback, no run row,
no stage folder, and an existing run of the same work dir left byte-identical (issue 17)."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from rac.models.assets import tiny_model
from rac.models.streaming import model_revision
from rac.runs import stages as steps
from rac.runs.run_config import load_run_config, read_yaml
from rac.runs.workdir import RunRef
from rac.store.artifacts import sha256_tree
from rac.store.index import Index
from rac_prefect.flows.cli import EXIT_BAD_INPUT, main

TINY = Path(__file__).resolve().parents[1] / "data" / "configs" / "tiny.yaml"


def _truncate_weights(model: Path, tmp: Path) -> dict[str, Any]:
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return {}


def _bert(model: Path, tmp: Path) -> dict[str, Any]:
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    return {}


def _no_question_column(model: Path, tmp: Path) -> dict[str, Any]:
    src = tmp / "q.jsonl"
    src.write_text("\n".join(json.dumps({"q": f"{i}+1?", "answer": str(i + 1)}) for i in range(6)) + "\n")
    return {"prompts": {"source": "file", "path": str(src), "n": 4}}


def _empty_gold(model: Path, tmp: Path) -> dict[str, Any]:
    src = tmp / "e.jsonl"
    src.write_text("\n".join(json.dumps({"question": f"{i}+1?", "answer": ""}) for i in range(6)) + "\n")
    return {"eval": {"prompts": {"source": "file", "path": str(src), "n": 4}}}


CASES: dict[str, tuple[Callable[[Path, Path], dict[str, Any]], str]] = {
    "truncated-weights": (_truncate_weights, "is truncated"),
    "unsupported-architecture": (_bert, "model_type 'bert' is not supported"),
    "no-question-column": (_no_question_column, "column 'question' not found"),
    "empty-gold-answers": (_empty_gold, "gold answers (column 'answer') are empty"),
}


@pytest.fixture(scope="module")
def existing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work dir holding one run's prompts and calibration (stage steps, no Prefect)."""
    work = tmp_path_factory.mktemp("existing")
    cfg = load_run_config(TINY)
    model = tiny_model("llama")
    env = RunRef(str(work), "old", str(model), model_revision(model))
    Index(work).create_run("old", "t", {}, {}, "", 1)
    prompts = steps.prompts_step(env, cfg.prompts, log=lambda m: None)
    steps.calib_step(env, "prompt", cfg.calibrations["prompt"], prompts, None, log=lambda m: None)
    return work


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_anything_is_written(case: str, existing: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    damage, expected = CASES[case]
    model = Path(shutil.copytree(tiny_model("llama"), tmp_path / "model"))
    raw = copy.deepcopy(read_yaml(TINY))
    raw["model"] = str(model)
    for key, value in damage(model, tmp_path).items():
        raw[key] = {**raw[key], **value} if key == "eval" else value
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    before = sha256_tree(existing)
    runs_before = [r["run_id"] for r in Index(existing).list_runs()]
    assert main(["--work-dir", str(existing), "run", str(cfg_path), "--run-id", "new"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert [r["run_id"] for r in Index(existing).list_runs()] == runs_before  # no run row
    assert not (existing / "runs" / "new").exists()
    assert sha256_tree(existing) == before  # the existing run's files are byte-identical
