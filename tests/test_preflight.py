"""Preflight: every bad model folder, prompt source and work dir is refused in one line, writing nothing."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.data.sources import load_records
from rac.models.assets import tiny_model
from rac.runs.preflight import PreflightError, preflight
from rac.runs.run_config import RunConfig, parse_run_config, read_yaml

TINY = Path(__file__).resolve().parents[1] / "data" / "configs" / "tiny.yaml"
ROWS = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A private copy of the tiny Llama folder, free to damage."""
    return Path(shutil.copytree(tiny_model("llama"), tmp_path / "model"))


def parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def file_prompts(path: Path, **kw: Any) -> dict[str, Any]:
    return {"source": "file", "path": str(path), "n": 4, **kw}


def config(model: Path, prompts: dict[str, Any] | None = None, eval_prompts: dict[str, Any] | None = None) -> RunConfig:
    raw = copy.deepcopy(read_yaml(TINY))
    raw["model"] = str(model)
    if prompts is not None:
        raw["prompts"] = prompts
    if eval_prompts is not None:
        raw["eval"]["prompts"] = eval_prompts
    return parse_run_config(raw, source="test")


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(cfg: RunConfig, root: Path, *names: str, work: Path | None = None) -> str:
    """Preflight's one-line message, after checking it names every `names` and nothing was created."""
    work = work or root / "work"
    before, existed = tree(root), work.exists()
    with pytest.raises(PreflightError) as info:
        preflight(cfg, work)
    message = str(info.value)
    assert "\n" not in message and message.startswith("preflight: ")
    for name in names:
        assert name in message, message
    assert tree(root) == before and work.exists() == existed
    return message


def test_tiny_config_passes(tmp_path: Path) -> None:
    before = tree(tmp_path)
    preflight(parse_run_config(read_yaml(TINY)), tmp_path / "work")
    preflight(parse_run_config(read_yaml(TINY)), tmp_path)  # an existing (empty) work dir
    assert tree(tmp_path) == before


def test_file_sources_on_a_model_copy_pass(tmp_path: Path, model: Path) -> None:
    """The baseline every refusal below changes in one place."""
    calib = parquet(tmp_path / "calib.parquet", ROWS)
    ev = jsonl(tmp_path / "eval.jsonl", ROWS)
    preflight(config(model, file_prompts(calib), file_prompts(ev)), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_truncated_weights(tmp_path: Path, model: Path) -> None:
    shard = model / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    msg = refused(config(model), tmp_path, str(shard), "truncated", "re-download")
    assert f"{shard.stat().st_size} bytes on disk" in msg


def test_unsupported_architecture(tmp_path: Path, model: Path) -> None:
    cfg_file = model / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "bert"}))
    refused(config(model), tmp_path, str(cfg_file), "model_type 'bert'", "supported model types",
            "'llama'", "'qwen3'")


def test_no_chat_template(tmp_path: Path, model: Path) -> None:
    (model / "chat_template.jinja").unlink()
    assert "chat_template" not in (model / "tokenizer_config.json").read_text()
    refused(config(model), tmp_path, "prompts.template:", "has no chat template",
            "prompts.template.chat_template is not set")
    given = {**read_yaml(TINY)["prompts"], "template": {"chat_template": "{{ messages[0]['content'] }}\n"}}
    preflight(config(model, given), tmp_path / "work")  # the config's template fills in (eval inherits it)


def test_prompts_without_question_column(tmp_path: Path, model: Path) -> None:
    src = parquet(tmp_path / "p.parquet", [{"q": r["question"], "answer": r["answer"]} for r in ROWS])
    refused(config(model, file_prompts(src)), tmp_path, f"prompts.path = '{src}'", "column 'question'",
            "prompts.question_col", "['q', 'answer']")


def test_prompts_with_no_rows(tmp_path: Path, model: Path) -> None:
    schema = pa.schema([("question", pa.string()), ("answer", pa.string())])
    src = parquet(tmp_path / "p.parquet", [], schema)
    refused(config(model, file_prompts(src)), tmp_path, f"prompts.path = '{src}'", "no rows")
    empty = jsonl(tmp_path / "e.jsonl", [])
    refused(config(model, None, file_prompts(empty)), tmp_path, f"eval.prompts.path = '{empty}'", "no rows")


def test_calibration_prompts_without_answers(tmp_path: Path, model: Path) -> None:
    """Calibration needs no answers; preflight refuses exactly when the prompt stage would fail."""
    src = jsonl(tmp_path / "p.jsonl", [{"question": r["question"]} for r in ROWS])
    preflight(config(model, file_prompts(src)), tmp_path / "work")
    assert [r.answer for r in load_records("file", path=str(src))] == [""] * len(ROWS)
    no_answer_col = config(model, None, file_prompts(src))
    refused(no_answer_col, tmp_path, f"eval.prompts.path = '{src}'", "column 'answer'", "eval.prompts.answer_col")


def test_eval_gold_answers_all_empty(tmp_path: Path, model: Path) -> None:
    src = jsonl(tmp_path / "eval.jsonl", [{"question": r["question"], "answer": ""} for r in ROWS])
    refused(config(model, None, file_prompts(src)), tmp_path, f"eval.prompts.path = '{src}'",
            "4 of 4 gold answers (column 'answer') are empty", "eval.prompts.answer_col")
    preflight(config(model, file_prompts(src)), tmp_path / "work")  # calibration does not grade


def test_read_only_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, mode 0o555 does not stop writes (and no read-only bind mount is at hand), so the probe's
    os.open is made to fail with EROFS, as a read-only file system would; otherwise the mode is real."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        real_open = os.open

        def read_only(path: Any, *args: Any, **kwargs: Any) -> int:
            if str(path).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    else:
        ro.chmod(0o555)
    try:
        for work in (ro / "work", ro):  # a work dir still to create, and an existing one
            refused(parse_run_config(read_yaml(TINY)), tmp_path, f"work dir '{work}'", f"cannot write in '{ro}'",
                    "--work-dir", work=work)
    finally:
        ro.chmod(0o755)


def test_not_enough_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    cfg = parse_run_config(read_yaml(TINY))
    shard = (tiny_model("llama") / "model.safetensors").stat().st_size
    stores = 4000 * 64 * 4 * 2  # tiny.yaml: token_budget x hidden x float32 x 2 stores
    msg = refused(cfg, tmp_path, "1000 B free", "activation stores 1.95 MiB", f"{len(cfg.jobs)} x ")
    assert f"pruned models {len(cfg.jobs) * shard / 2**20:.2f} MiB ({len(cfg.jobs)} x {shard / 2**10:.2f} KiB)" in msg
    assert f"needs about {(stores + len(cfg.jobs) * shard) / 2**20:.2f} MiB" in msg
