"""The `rac` CLI: bad input (exit 2, no run row, nothing written), sql over the index views (writes refused),
status, report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rac.store.index import Index, LayerRow
from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_OK, main

TINY = Path(__file__).resolve().parent.parent / "data" / "configs" / "tiny.yaml"


def _cots_work_dir(work: Path) -> list[int]:
    """A work dir with a run row and two CoT shards; returns the decode lengths written."""
    Index(work).create_run("r1", "demo", {"a": 1}, {"model_dir": "m", "model_revision": "x", "rac_version": "0"},
                           "", 1)
    lengths = [[12, 30], [7]]
    for shard, lens in enumerate(lengths):
        path = work / "stages" / "cots" / "abc" / f"part-{shard:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"prompt_id": list(range(len(lens))), "completion_len": lens}), str(path))
    return [n for lens in lengths for n in lens]


def printed_table(out: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows of cells) of the one rich table in `out` (heavy bars head, light bars body)."""
    head = [[c.strip() for c in line.strip().strip("┃").split("┃")] for line in out.splitlines() if "┃" in line]
    body = [[c.strip() for c in line.strip().strip("│").split("│")] for line in out.splitlines() if "│" in line]
    assert len(head) == 1, out
    return head[0], body


def test_sql_answers_from_views_and_refuses_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import duckdb

    flat = _cots_work_dir(tmp_path)
    shards = sorted((tmp_path / "stages" / "cots" / "abc").glob("part-*.parquet"))
    direct = pa.concat_tables(pq.read_table(f) for f in shards)  # the files themselves, not the view
    assert direct.column("completion_len").to_pylist() == flat
    assert main(["--work-dir", str(tmp_path), "sql", "select count(*), avg(completion_len) from cots"]) == EXIT_OK
    head, rows = printed_table(capsys.readouterr().out)
    assert head == ["count_star()", "avg(completion_len)"]
    assert [[int(rows[0][0]), float(rows[0][1])]] == [[direct.num_rows, sum(flat) / len(flat)]] and len(rows) == 1
    query = "select prompt_id, completion_len, stage_key from cots order by completion_len"
    assert main(["--work-dir", str(tmp_path), "sql", query]) == EXIT_OK
    head, rows = printed_table(capsys.readouterr().out)
    assert head == ["prompt_id", "completion_len", "stage_key"]
    expected = sorted(zip(direct.column("prompt_id").to_pylist(), flat, strict=True), key=lambda r: r[1])
    assert rows == [[str(p), str(n), "abc"] for p, n in expected]  # stage_key: the folder the file is in
    glob = str(tmp_path / "stages" / "cots" / "*" / "part-*.parquet")
    with duckdb.connect() as con:  # the same query straight on the files
        want = con.execute(f"select prompt_id, completion_len from read_parquet('{glob}') order by completion_len").fetchall()
    assert [(int(p), int(n)) for p, n, _ in rows] == want
    for stmt in ("delete from runs", "update runs set status = 'x'", "create table t (a int)",
                 "insert into runs (run_id) values ('z')"):
        assert main(["--work-dir", str(tmp_path), "sql", stmt]) == EXIT_BAD_INPUT
        assert "read-only" in capsys.readouterr().err
    assert main(["--work-dir", str(tmp_path), "sql", "select nonsense from nowhere"]) == EXIT_BAD_INPUT
    assert "nowhere" in capsys.readouterr().err
    _, rows = Index(tmp_path).query("select count(*) from runs")
    assert rows == [(1,)]


def test_status_lists_runs_and_unknown_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--work-dir", str(tmp_path / "empty"), "status"]) == EXIT_BAD_INPUT
    assert "no index" in capsys.readouterr().err
    _cots_work_dir(tmp_path)
    assert main(["--work-dir", str(tmp_path), "status"]) == EXIT_OK
    head, rows = printed_table(capsys.readouterr().out)
    assert head == ["run", "name", "status", "created", "updated", "message"]
    run = Index(tmp_path).get_run("r1")
    assert run is not None and run["status"] == "running"
    assert rows == [["r1", "demo", "interrupted (rac resume)", str(run["created"])[:19], str(run["updated"])[:19], ""]]
    # status 'running' in the index, but nobody holds its lock
    assert main(["--work-dir", str(tmp_path), "status", "nope"]) == EXIT_BAD_INPUT
    assert "'nope'" in capsys.readouterr().err


def test_report_writes_markdown_and_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = Index(tmp_path)
    idx.create_run("r1", "demo", {}, {"model_dir": "/m", "model_revision": "abc", "rac_version": "0.1.0"}, "", 1)
    evals: list[dict[str, Any]] = [
        {"model": "dense", "sparsity": 0.0, "accuracy": 0.5, "ci_low": 0.3, "ci_high": 0.7, "mean_tokens": 100.0,
         "median_tokens": 90.0, "p90_tokens": 180.0, "runaway_share": 0.1, "wall_s": 12.0, "tokens_per_s": 50.0, "n_problems": 20},
        {"model": "rac-sparsegpt-50pct", "calibration": "rac", "method": "sparsegpt", "sparsity": 0.5,
         "accuracy": 0.4, "ci_low": 0.2, "ci_high": 0.6, "mean_tokens": 130.0, "median_tokens": 120.0,
         "p90_tokens": 256.0, "runaway_share": 0.25, "wall_s": 15.0, "tokens_per_s": 45.0, "n_problems": 20},
    ]
    for ev in evals:
        idx.record_eval("r1", ev["model"], "k-" + ev["model"], ev)
    idx.stage_started("r1", "prune/rac-sparsegpt-50pct", "prune", "pk", {}, [])
    errors = {0: [0.01, 0.03], 1: [0.05, 0.07]}
    for layer, errs in errors.items():
        rows = [LayerRow(layer, 0, f"model.layers.{layer}.lin{i}", 0.5, e, 1.0, 0.01, 0, 0.1) for i, e in enumerate(errs)]
        idx.record_step("r1", "pk", layer, 0, rows, [])
    assert main(["--work-dir", str(tmp_path), "report", "r1"]) == EXIT_OK
    report = tmp_path / "runs" / "r1" / "report"
    md = (report / "report.md").read_text()
    assert "| rac-sparsegpt-50pct | rac | sparsegpt | 0.50 | 0.400 | [0.200, 0.600] | 130.0 |" in md
    assert "| dense | - | - | 0.00 | 0.500 | [0.300, 0.700] | 100.0 | 90.0 | 180.0 | 0.100 | 12.0 | 50.0 |" in md
    assert re.search(r"\| rac-sparsegpt-50pct \| 0\.0200 \| 0\.0600 \|", md)  # per-layer means
    for png in ("metrics.png", "layer_error.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(report / "report.md") in capsys.readouterr().out
    assert main(["--work-dir", str(tmp_path), "report", "missing"]) == EXIT_BAD_INPUT


def test_bad_input_exits_2_without_a_run_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(TINY.read_text())
    cases: dict[str, tuple[Any, str]] = {
        "malformed": ("name: x\nprune:\n  - method: wanda\n   sparsity: 0.5\n", "malformed YAML at line 4"),
        "unknown-key": ({**data, "sparsity": 0.5}, "unknown key(s) ['sparsity']; known keys: name, model"),
        "unknown-pruner": ({**data, "prune": [{"method": "obs", "sparsity": 0.5}]}, "unknown pruning method 'obs'"),
        "sparsity": ({**data, "prune": [{"method": "wanda", "sparsity": 1.5}]}, "prune[0].sparsity = 1.5"),
        "model": ({**data, "model": str(tmp_path / "no-such-model")}, "no-such-model' does not exist"),
    }
    work = tmp_path / "work"
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        assert main(["--work-dir", str(work), "run", str(path)]) == EXIT_BAD_INPUT, name
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), (name, err)
        assert not Index(work).path.exists() or Index(work).list_runs() == []
        assert not (work / "runs").exists()
    assert main(["--work-dir", str(work), "resume", "nope"]) == EXIT_BAD_INPUT
    assert "no run 'nope'" in capsys.readouterr().err
