"""CLI habits: global options after the command, `rac sql --format`, wide cells cut only in the table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from rac.store.index import Index
from rac_prefect.flows.cli import EXIT_OK, build_parser, main
from rac_prefect.flows.cli_workdir import SQL_CELL_WIDTH

CONFIG = {"name": "demo", "notes": "x" * 200}  # a JSON column wider than a table cell


@pytest.fixture
def work(tmp_path: Path) -> Path:
    idx = Index(tmp_path)
    idx.create_run("r1", "demo", CONFIG, {"model_dir": "/m"}, "/cfg.yaml", 1)
    idx.create_run("r2", "other", {"name": "other"}, {"model_dir": "/m"}, "", 2, status="done")
    return tmp_path


def test_global_options_before_or_after_the_command() -> None:
    p = build_parser()
    assert p.parse_args(["--work-dir", "A", "status"]).work_dir == "A"
    assert p.parse_args(["status", "--work-dir", "B"]).work_dir == "B"
    assert p.parse_args(["run", "c.yaml", "--work-dir", "C", "--debug"]).work_dir == "C"
    assert p.parse_args(["run", "c.yaml", "--debug"]).debug is True
    assert p.parse_args(["run", "c.yaml"]).debug is False and p.parse_args(["status"]).work_dir is None


def test_sql_csv_and_json_are_exact(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    query = "select run_id, name, status, pid, config from runs order by run_id"
    assert main(["sql", query, "--work-dir", str(work), "--format", "csv"]) == EXIT_OK
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["run_id", "name", "status", "pid", "config"]
    assert [r[:4] for r in rows[1:]] == [["r1", "demo", "running", "1"], ["r2", "other", "done", "2"]]
    assert json.loads(rows[1][4]) == CONFIG  # whole, not cut
    assert main(["sql", query, "--work-dir", str(work), "--format", "json"]) == EXIT_OK
    got = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["pid"]) for r in got] == [("r1", 1), ("r2", 2)] and json.loads(got[0]["config"]) == CONFIG


def test_sql_table_cuts_wide_cells(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "select config from runs where run_id = 'r1'", "--work-dir", str(work)]) == EXIT_OK
    out = capsys.readouterr().out
    cell = next(line for line in out.splitlines() if '"name"' in line).strip("│ ")
    assert cell.endswith("…") and len(cell) == SQL_CELL_WIDTH
    assert len(out.splitlines()) == 5  # one row is one line: top, header, rule, row, bottom
