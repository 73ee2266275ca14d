"""`rac.api`: calibrate / prune / evaluate from Python share the CLI's stages, cache and index; typed results
agree with the files and the index they point at; bad arguments fail in one line before anything is written;
docs/python-api.md runs as written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

import rac.api
from rac.data.generate import GenerateConfig
from rac.data.templates import TemplateConfig
from rac.store.index import Index
from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_OK, main
from tests.workdirs import calibration_stages

ROOT = Path(__file__).resolve().parent.parent
QUIET = {"log": lambda line: None}
PROBLEMS = [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
F32 = {"act_dtype": "float32", "compute_dtype": "float32"}


def sql(work: Path, query: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["--work-dir", str(work), "sql", query, "--format", "json"]) == EXIT_OK
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


def test_api_reuses_the_stages_of_the_cli(tmp_path: Path) -> None:
    """tiny.yaml's prompts -> CoTs -> rac calibration through the steps `rac run` uses, then the same config
    through rac.api: found in the index, same stage key and file, nothing computed."""
    made = calibration_stages(tmp_path, "cli-run")
    cfg = made["cfg"]
    ccfg = cfg.calibrations["rac"]
    cal = rac.api.calibrate("tiny-llama", cfg.prompts, kind="rac", token_budget=ccfg.token_budget,
                            max_seq_len=ccfg.max_seq_len, min_decode_share=ccfg.min_decode_share,
                            generate=cfg.generate, work_dir=tmp_path, **QUIET)
    cli = made["calib"]["rac"]
    assert cal.reused and cal.stage_key == cli.stage_key and cal.artifact == cli.output("calibration")
    assert cal.n_tokens == cli.summary["n_tokens"] and cal.decode_share == cli.summary["decode_share"]
    assert cal.run_id != "cli-run" and cal.run_id.startswith("api-")
    rows = Index(tmp_path).run_stages(cal.run_id)
    assert [(r["name"], r["status"], bool(r["reused"])) for r in rows] == \
        [("prompts", "done", True), ("cots", "done", True), ("calib/rac", "done", True)]
    seqs = cal.sequences()
    assert sum(len(s.input_ids) for s in seqs) == cal.n_tokens == sum(len(s.segment) for s in seqs)
    decode = sum(s.segment.count(1) for s in seqs)
    assert decode / cal.n_tokens == pytest.approx(cal.decode_share)


def test_prompt_forms_share_one_file_and_key(tmp_path: Path) -> None:
    from datasets import Dataset

    first = rac.api.calibrate("tiny-llama", PROBLEMS, kind="prompt", token_budget=500, work_dir=tmp_path, **QUIET)
    as_dataset = rac.api.calibrate("tiny-llama", Dataset.from_list(PROBLEMS), kind="prompt", token_budget=500,
                                   work_dir=tmp_path, **QUIET)
    as_question = rac.api.calibrate("tiny-llama", [{"question": p["prompt"], "answer": p["answer"]} for p in PROBLEMS],
                                    kind="prompt", token_budget=500, work_dir=tmp_path, **QUIET)
    assert not first.reused and as_dataset.reused and as_question.reused
    assert first.stage_key == as_dataset.stage_key == as_question.stage_key
    assert [p.name for p in (tmp_path / "inputs").iterdir()] == [Path(first_input(tmp_path)).name]
    stored = [json.loads(line) for line in Path(first_input(tmp_path)).read_text().splitlines()]
    assert stored == [{"id": f"p{i:05d}", "question": p["prompt"], "answer": p["answer"]} for i, p in enumerate(PROBLEMS)]
    # prompts only (no answers) and another template are other inputs: other keys
    bare = rac.api.calibrate("tiny-llama", [p["prompt"] for p in PROBLEMS], kind="prompt", token_budget=500,
                             work_dir=tmp_path, **QUIET)
    r1 = rac.api.calibrate("tiny-llama", PROBLEMS, kind="prompt", token_budget=500, work_dir=tmp_path,
                           template=TemplateConfig(style="r1"), **QUIET)
    assert len({first.stage_key, bare.stage_key, r1.stage_key}) == 3 and not bare.reused and not r1.reused
    texts = [s.input_ids for s in first.sequences()]
    assert texts != [s.input_ids for s in r1.sequences()]
    assert all(set(s.segment_names()) == {"prompt"} for s in first.sequences())


def test_api_runs_are_listed_and_not_resumed_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cal = rac.api.calibrate("tiny-llama", PROBLEMS, kind="prompt", token_budget=500, work_dir=tmp_path, **QUIET)
    runs = sql(tmp_path, "select run_id, name, status, config->>'$.source' as source from runs", capsys)
    assert runs == [{"run_id": cal.run_id, "name": "api", "status": "done", "source": "rac.api"}]
    capsys.readouterr()
    assert main(["--work-dir", str(tmp_path), "resume", cal.run_id]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"run {cal.run_id!r} was made by rac.api" in err, err


def first_input(work: Path) -> str:
    return str(next((work / "inputs").glob("prompts-*.jsonl")))


@pytest.mark.slow
def test_prune_and_evaluate_agree_with_files_and_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cal = rac.api.calibrate("tiny-llama", PROBLEMS, kind="prompt", token_budget=500, work_dir=tmp_path, **QUIET)
    pruned = rac.api.prune("tiny-llama", cal, method="sparsegpt", sparsity=0.5, engine=F32, **QUIET)
    assert pruned.label == "prompt-sparsegpt-50pct" and pruned.run_id == cal.run_id
    weights = {k: v for f in sorted(pruned.folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    linears = [k for k in weights if re.search(r"\.(q|k|v|o|gate|up|down)_proj\.weight$", k)]
    assert sorted(r.linear + ".weight" for r in pruned.records) == sorted(linears) and len(linears) == 14
    zeros = sum(int((weights[k] == 0).sum()) for k in linears)
    assert pruned.achieved_sparsity == pytest.approx(zeros / sum(weights[k].numel() for k in linears), abs=1e-9)
    for r in pruned.records:  # each record's achieved sparsity is the zeros its weight holds in the folder
        w = weights[r.linear + ".weight"]
        assert int((w == 0).sum()) == round(r.sparsity * w.numel()) and r.sparsity == pytest.approx(0.5, abs=0.02)
    assert [r["linear"] for r in sql(tmp_path, f"select linear from layers where stage_key = '{pruned.stage_key}' "
                                     "order by layer, \"group\", linear", capsys)] == [r.linear for r in pruned.records]

    gen = GenerateConfig(max_new_tokens=6, token_budget=None, dtype="float32")
    ev = rac.api.evaluate(pruned, PROBLEMS, generation=gen, bootstrap=200, **QUIET)
    rows = ev.rows()
    correct, lengths = rows.column("correct").to_pylist(), rows.column("completion_len").to_pylist()
    assert (ev.n_problems, ev.n_samples) == (len(PROBLEMS), rows.num_rows) == (3, 3)
    assert ev.accuracy == pytest.approx(sum(correct) / len(correct))
    assert ev.mean_tokens == pytest.approx(sum(lengths) / len(lengths))
    assert ev.runaway_share == pytest.approx(rows.column("finish_reason").to_pylist().count("length") / 3)
    gold = dict(zip(rows.column("prompt_id").to_pylist(), rows.column("gold").to_pylist(), strict=True))
    assert gold == {f"p{i:05d}": p["answer"] for i, p in enumerate(PROBLEMS)}
    stored = sql(tmp_path, f"select * from evals where run_id = '{ev.run_id}'", capsys)
    assert [(s["label"], s["stage_key"], s["accuracy"], s["mean_tokens"], s["runaway_share"], s["calibration"])
            for s in stored] == [(ev.label, ev.stage_key, ev.accuracy, ev.mean_tokens, ev.runaway_share, "prompt")]
    again = rac.api.evaluate(pruned, PROBLEMS, generation=gen, bootstrap=200, **QUIET)
    assert again.reused and again.stage_key == ev.stage_key and again.accuracy == ev.accuracy
    assert main(["--work-dir", str(tmp_path), "status", cal.run_id]) == EXIT_OK
    status = capsys.readouterr().out
    assert "done" in status and all(n in status for n in ("calib/prompt", "prune/prompt-sparsegpt-50pct",
                                                          "eval/prompt-sparsegpt-50pct"))


def _fake_calibration(tmp_path: Path) -> rac.api.Calibration:
    """A calibration record of some other model (nothing behind it is read before the model check)."""
    from rac.store.artifacts import ArtifactRef

    ref = ArtifactRef(uri=(tmp_path / "x.parquet").as_uri(), sha256="0" * 64, bytes=1, kind="calibration")
    return rac.api.Calibration("c", "prompt", "r", tmp_path, "k", ref.path, ref, tmp_path, "f" * 64, 1, 1, 0.0,
                               1.0, 0.0, False, None, None, False)


BAD = {  # case -> (call, text the one-line error must hold)
    "empty prompts": (lambda w: rac.api.calibrate("tiny-llama", [], kind="prompt", work_dir=w), "prompts is empty"),
    "no text key": (lambda w: rac.api.calibrate("tiny-llama", [{"text": "hi"}], kind="prompt", work_dir=w),
                    "prompts[0] has no 'prompt' or 'question' key; keys: ['text']"),
    "empty text": (lambda w: rac.api.calibrate("tiny-llama", ["ok", " "], kind="prompt", work_dir=w),
                   "prompts[1]['prompt'] = ' ': expected non-empty text"),
    "repeated id": (lambda w: rac.api.calibrate("tiny-llama", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}],
                                                kind="prompt", work_dir=w), "prompts[1] repeats id '1'"),
    "rac without prompts": (lambda w: rac.api.calibrate("tiny-llama", kind="rac", work_dir=w),
                            "kind 'rac' needs prompts"),
    "generic with prompts": (lambda w: rac.api.calibrate("tiny-llama", ["a"], kind="generic", work_dir=w),
                             "kind 'generic' takes no prompts"),
    "unknown kind": (lambda w: rac.api.calibrate("tiny-llama", ["a"], kind="chat", work_dir=w), "kind = 'chat'"),
    "bad budget": (lambda w: rac.api.calibrate("tiny-llama", ["a"], kind="prompt", token_budget=0, work_dir=w),
                   "token_budget = 0"),
    "unknown model": (lambda w: rac.api.calibrate("no-such-model", ["a"], kind="prompt", work_dir=w),
                      "model path 'no-such-model' does not exist"),
    "sparsity": (lambda w: rac.api.prune("tiny-llama", _fake_calibration(w), sparsity=1.5),
                 "prune: sparsity = 1.5: sparsity must be a number in [0, 1)"),
    "method": (lambda w: rac.api.prune("tiny-llama", _fake_calibration(w), method="obs", sparsity=0.5),
               "method = 'obs': unknown pruning method 'obs'"),
    "engine key": (lambda w: rac.api.prune("tiny-llama", _fake_calibration(w), sparsity=0.5, engine={"dvice": "cpu"}),
                   "unknown key 'dvice'"),
    "other model": (lambda w: rac.api.prune("tiny-llama", _fake_calibration(w), sparsity=0.5),
                    "is not the model calibration 'c' was built with"),
    "no answers": (lambda w: rac.api.evaluate("tiny-llama", ["What is 1 plus 1?"], work_dir=w),
                   "prompts[0] (id 'p00000') has no 'answer'"),
    "eval budget": (lambda w: rac.api.evaluate("tiny-llama", PROBLEMS, generation=GenerateConfig(), work_dir=w),
                    "generation.token_budget must be None"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_fail_in_one_line_before_writing(case: str, tmp_path: Path) -> None:
    call, text = BAD[case]
    work = tmp_path / "work"
    with pytest.raises(rac.api.ApiError) as info:
        call(work)
    message = str(info.value)
    assert "\n" not in message and text in message, message
    assert not work.exists()


@pytest.mark.slow
def test_python_api_doc_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Every ```python block of docs/python-api.md, in order, in one namespace (as a notebook would)."""
    doc = (ROOT / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", doc, flags=re.S | re.M)
    assert len(blocks) == 6
    monkeypatch.setenv("RAC_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.chdir(tmp_path)
    ns: dict[str, Any] = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/python-api.md[python block {i}]", "exec"), ns)  # noqa: S102
    printed = capsys.readouterr().out
    cal, pruned, ev, dense = ns["cal"], ns["pruned"], ns["ev"], ns["dense"]
    assert cal.work_dir == tmp_path / "work" and pruned.run_id == ev.run_id == dense.run_id == cal.run_id
    assert "prune: sparsity = 1.5: sparsity must be a number in [0, 1), got 1.5" in printed
    assert "prune: method = 'obs': unknown pruning method 'obs'; known: [" in printed
    labels = sorted(r["label"] for r in sql(cal.work_dir, f"select label from evals where run_id = '{cal.run_id}'",
                                            capsys))
    assert labels == sorted(["dense", pruned.label])
    harness = sql(cal.work_dir, "select label, task, metric, value from harness_results", capsys)
    assert {(h["label"], h["task"], h["metric"]) for h in harness} == {("dense", "my_arith", "acc"),
                                                                       (pruned.label, "my_arith", "acc")}
