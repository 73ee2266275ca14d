"""Preflight: every bad model folder, prompt source and work dir is refused in one line, writing nothing."""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.data.calib import build_calibration
from rac.data.generate import generate_cots
from rac.data.prompts import sample_prompts
from rac.data.sources import load_records
from rac.models.assets import tiny_model
from rac.runs.preflight import PreflightError, preflight
from rac.runs.run_config import RunConfig, parse_run_config, read_yaml
from rac.runs.session import resolve_model_dir

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
        for calib in raw["calibrations"].values():  # a few short file prompts: budgets they can fill
            calib["token_budget"] = 200
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


def test_prompts_group_col_missing(tmp_path: Path, model: Path) -> None:
    """A `group_col` the file lacks is refused before anything is written, naming the key and the columns."""
    src = parquet(tmp_path / "p.parquet", [{"question": r["question"], "answer": r["answer"]} for r in ROWS])
    refused(config(model, {**file_prompts(src), "group_col": "template"}), tmp_path, f"prompts.path = '{src}'",
            "'template'", "prompts.group_col", "['question', 'answer']")


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


# ---- calibration budgets reachable (issue 17) ----
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "data" / "configs").glob("*.yaml"))


def tiny_raw(**calibs: dict[str, Any]) -> dict[str, Any]:
    """tiny.yaml with calibrations.<name> updated by `calibs`."""
    raw = copy.deepcopy(read_yaml(TINY))
    for name, update in calibs.items():
        raw["calibrations"][name] = {**raw["calibrations"].get(name, {}), **update}
    return raw


def tiny_with(**calibs: dict[str, Any]) -> RunConfig:
    return parse_run_config(tiny_raw(**calibs), source="test")


def bound(msg: str) -> int:
    """The 'at most N' of a budget refusal."""
    return int(re.search(r"at most (\d+) (?:calibration )?tokens", msg).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def stage_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.yaml's prompts.parquet, written by the prompt stage itself."""
    cfg = parse_run_config(read_yaml(TINY))
    out = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    sample_prompts(cfg.prompts, resolve_model_dir(cfg.model), out)
    return out


def test_prompt_budget_over_its_prompts_is_refused_with_the_numbers(tmp_path: Path, stage_prompts: Path) -> None:
    """The bound is exactly what the prompt stage writes (each prompt cut to max_seq_len), and what the
    calibration stage then packs; 10x it still passes (exhausted by design), one token more is refused."""
    cfg = tiny_with(prompt={"token_budget": 1_000_000, "max_seq_len": 200})
    have = sum(min(len(ids), 200) for ids in pq.read_table(stage_prompts).column("input_ids").to_pylist())
    msg = refused(cfg, tmp_path, "calibrations.prompt: token_budget = 1000000", f"at most {have} tokens",
                  "the 6 prompts the prompt stage will select", "prompts.source = 'gsm8k'", "max_seq_len = 200",
                  "raise prompts.n", f"lower calibrations.prompt.token_budget to at most {have}")
    assert bound(msg) == have
    s = build_calibration(cfg.calibrations["prompt"], resolve_model_dir(cfg.model), tmp_path / "c.parquet",
                          prompts_path=stage_prompts)
    assert s.exhausted and s.n_tokens == have
    (tmp_path / "c.parquet").unlink()
    preflight(tiny_with(prompt={"token_budget": 10 * have, "max_seq_len": 200}), tmp_path / "work")
    refused(tiny_with(prompt={"token_budget": 10 * have + 1, "max_seq_len": 200}), tmp_path, f"at most {have}")


def test_prompt_budget_within_its_prompts_passes(tmp_path: Path) -> None:
    preflight(tiny_with(prompt={"token_budget": 500}, rac={"token_budget": 500}), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_prompt_source_exhausted_asks_for_a_larger_source(tmp_path: Path, model: Path) -> None:
    src = parquet(tmp_path / "calib.parquet", ROWS)
    raw = tiny_raw(prompt={"token_budget": 100_000})
    raw.update(model=str(model), prompts=file_prompts(src, n=None))
    refused(parse_run_config(raw), tmp_path, "the 8 prompts", "use a larger prompt source",
            "all 8 selectable prompts are used")


def test_rac_budget_over_the_generation_bound_is_refused(tmp_path: Path, stage_prompts: Path) -> None:
    """prompt + min(max_new_tokens, context - prompt) per sample, cut to max_seq_len; the real CoT and
    calibration stages stay within it."""
    cfg = tiny_with(rac={"token_budget": 1_000_000})
    msg = refused(cfg, tmp_path, "calibrations.rac: token_budget = 1000000", "the CoT stage can give it at most",
                  "6 prompts x generate.samples_per_prompt = 1", "generate.max_new_tokens = 32", "max_seq_len = 1024",
                  "raise prompts.n", "lower calibrations.rac.token_budget to at most")
    prompt_ids = pq.read_table(stage_prompts).column("input_ids").to_pylist()
    assert bound(msg) == sum(len(p) + 32 for p in prompt_ids)  # tiny prompts are far from 1024 tokens
    raw = tiny_raw(rac={"token_budget": 1_000_000})
    raw["generate"] = {**raw["generate"], "samples_per_prompt": 3}
    assert bound(refused(parse_run_config(raw), tmp_path, "samples_per_prompt = 3")) == 3 * bound(msg)
    model_dir = resolve_model_dir(cfg.model)
    assert cfg.generate is not None
    generate_cots(stage_prompts, model_dir, cfg.generate, tmp_path / "cots")
    s = build_calibration(cfg.calibrations["rac"], model_dir, tmp_path / "c.parquet", cots_dir=tmp_path / "cots")
    assert s.exhausted and 0 < s.n_tokens <= bound(msg)


def test_rac_budget_cut_by_the_generation_budget_is_refused(tmp_path: Path, stage_prompts: Path) -> None:
    """generate.token_budget counts prompt + CoT tokens and is checked between shards: at most budget - 1
    plus the largest shard's tokens reach the calibration, even when the data would reach its budget."""
    raw = tiny_raw(rac={"token_budget": 1000})
    raw["generate"] = {**raw["generate"], "token_budget": 300, "shard_size": 1}
    cfg = parse_run_config(raw)
    prompt_ids = pq.read_table(stage_prompts).column("input_ids").to_pylist()
    cap = 300 - 1 + max(len(p) + 32 for p in prompt_ids)
    msg = refused(cfg, tmp_path, "calibrations.rac: token_budget = 1000", "generate.token_budget = 300",
                  f"after at most {cap} calibration tokens", "checked between shards of 1",
                  "raise generate.token_budget to at least 1000", f"lower calibrations.rac.token_budget to at most {cap}")
    assert bound(msg) == cap
    assert cfg.generate is not None
    model_dir = resolve_model_dir(cfg.model)
    generate_cots(stage_prompts, model_dir, cfg.generate, tmp_path / "cots")
    s = build_calibration(cfg.calibrations["rac"], model_dir, tmp_path / "c.parquet", cots_dir=tmp_path / "cots")
    assert s.exhausted and s.n_tokens <= cap
    raw["generate"]["token_budget"] = 1000  # the generation budget no longer binds
    preflight(parse_run_config(raw), tmp_path / "work")


def test_rac_sets_the_stage_would_fail_on(tmp_path: Path) -> None:
    refused(tiny_with(rac={"max_seq_len": 16}), tmp_path, "calibrations.rac: every one of the 6 prompts",
            "at least max_seq_len = 16", "no sequence", "raise calibrations.rac.max_seq_len above")
    refused(tiny_with(rac={"min_decode_share": 0.9}), tmp_path, "calibrations.rac: min_decode_share = 0.9",
            "generate.max_new_tokens = 32", "decode share is at most", "lower calibrations.rac.min_decode_share")


def test_generic_budget_over_the_bundled_corpus(tmp_path: Path) -> None:
    msg = refused(tiny_with(generic={"kind": "generic", "token_budget": 10**8}), tmp_path,
                  "calibrations.generic: token_budget = 100000000", "gensim's Lee corpus, 350 articles",
                  "lower calibrations.generic.token_budget to at most")
    have = int(re.search(r"is (\d+) tokens", msg).group(1))  # type: ignore[union-attr]
    preflight(tiny_with(generic={"kind": "generic", "token_budget": 10 * have}), tmp_path / "work")
    preflight(tiny_with(own={"kind": "self", "token_budget": 10**8}), tmp_path / "work")  # self: no bound


def test_prompt_over_its_limit_is_refused(tmp_path: Path) -> None:
    raw = copy.deepcopy(read_yaml(TINY))
    raw["prompts"]["max_prompt_tokens"] = 50
    refused(parse_run_config(raw), tmp_path, "prompts.source = 'gsm8k'", "prompts.max_prompt_tokens = 50",
            "the prompt stage would refuse it", "raise prompts.max_prompt_tokens")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_pass(path: Path, tmp_path: Path) -> None:
    """Every shipped config whose model is at hand offline (tiny.yaml, demo.yaml and qwen-0.5b.yaml where
    their wheels are installed; a model that would need a download is skipped)."""
    cfg = parse_run_config(read_yaml(path), source=str(path))
    try:
        resolve_model_dir(cfg.model)
    except (OSError, ValueError, ImportError) as exc:
        pytest.skip(f"model {cfg.model!r} is not available offline: {exc}")
    preflight(cfg, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_4bit_model_evaluated_on_vllm_needs_its_kernel(tmp_path: Path, model: Path) -> None:
    """A W4A16 job evaluated by engine 'vllm': refused up front where vLLM's CPU build lacks the W4A16 op
    (its AVX2 build), accepted where the op is there. Evaluated by transformers, or not evaluated: accepted."""
    import torch
    from vllm.platforms import current_platform

    raw = copy.deepcopy(read_yaml(TINY))
    raw["model"] = str(model)
    raw["prune"] = [{"method": "gptq", "bits": 4, "group_size": 32}]
    raw["eval"]["generation"]["engine"] = "vllm"
    cfg = parse_run_config(raw, source="test")
    current_platform.import_kernels()
    if current_platform.is_cpu() and not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        refused(cfg, tmp_path, "gptq-w4g32", "cpu_gemm_wna16",
                "engine 'transformers'", "eval_pruned")
    else:
        preflight(cfg, tmp_path / "work")
    for change in ({"eval_pruned": False}, {"eval": {**raw["eval"], "generation": {**raw["eval"]["generation"],
                                                                                 "engine": "transformers"}}}):
        preflight(parse_run_config({**raw, **change}, source="test"), tmp_path / "work")
    assert not (tmp_path / "work").exists()
