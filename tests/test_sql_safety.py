"""`rac sql` / `Index.query` reach only the index and its Parquet views: no other file, URL, extension or setting."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.store.index import Index, ReadOnlyQueryError
from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_OK, main

QUICK_S = 5.0  # a refusal comes at once; a download try would hang or take longer than this without a network


@dataclass
class Work:
    dir: Path
    cots: pa.Table  # the one CoT shard in the work dir, as written
    outside: Path  # a Parquet file outside the work dir
    home: Path  # $HOME for DuckDB (its extension directory lies under it)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Work:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work_dir = tmp_path / "work"
    idx = Index(work_dir)
    idx.create_run("r1", "demo", {"a": 1}, {"model_dir": "m", "model_revision": "x", "rac_version": "0"}, "", 1)
    idx.stage_started("r1", "cots", "cots", "abc", {}, [])
    cots = pa.table({"prompt_id": [0, 1, 2, 3], "completion_len": [12, 30, 7, 101]})
    shard = work_dir / "stages" / "cots" / "abc" / "part-00000.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(cots, str(shard))
    outside = tmp_path / "outside" / "secret.parquet"
    outside.parent.mkdir()
    pq.write_table(pa.table({"secret": ["s3cr3t"]}), str(outside))
    return Work(work_dir, cots, outside, home)


def _refused(work: Work) -> list[str]:
    out = str(work.outside).replace("'", "''")
    copy_to = str(work.dir.parent / "copied.csv")
    return [
        "select * from read_text('/etc/hostname')",
        "select * from read_csv('/etc/passwd')",
        f"select * from read_parquet('{out}')",
        f"select * from '{out}'",
        "select * from glob('/*')",
        f"select * from glob('{work.dir}/*')",
        "select * from read_blob('/etc/passwd')",
        "select * from 'https://example.com/x.parquet'",
        "select * from read_csv('http://example.com/x.csv')",
        "select * from read_parquet('s3://bucket/x.parquet')",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "RESET enable_external_access",
        "PRAGMA threads = 1",
        "PRAGMA enable_profiling",
        "CALL pragma_version()",
        "ATTACH '/tmp/x.duckdb'",
        "DETACH rac",
        f"COPY runs TO '{copy_to}'",
        f"EXPLAIN ANALYZE COPY runs TO '{copy_to}'",  # an EXPLAIN, so only the locked connection stops it
        "EXPORT DATABASE '/tmp/rac-export'",
        "select 1; select * from read_text('/etc/hostname')",
    ]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err and "\n" not in err, cap.err
    assert "Traceback" not in err and "s3cr3t" not in cap.out + cap.err
    return err


def test_cli_refuses_everything_outside_the_index_and_views(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    for sql in _refused(work):
        start = time.monotonic()
        assert main(["--work-dir", str(work.dir), "sql", sql]) == EXIT_BAD_INPUT, sql
        assert time.monotonic() - start < QUICK_S, sql
        err = _one_line_error(capsys)
        assert "refused" in err, (sql, err)
    assert not (work.dir.parent / "copied.csv").exists()
    assert not Path("/tmp/rac-export").exists()
    assert list(work.home.rglob("*")) == []  # no extension installed (or its folder made) on demand


def test_query_refusals_name_what_was_refused(work: Work) -> None:
    idx = Index(work.dir)
    for sql in _refused(work):
        with pytest.raises(ReadOnlyQueryError, match="refused") as info:
            idx.query(sql)
        assert "\n" not in str(info.value)
    for sql, named in [("select * from read_text('/etc/hostname')", "/etc/hostname"),
                       (f"select * from read_parquet('{work.outside}')", str(work.outside)),
                       ("select * from 'https://example.com/x.parquet'", "https://example.com/x.parquet"),
                       ("INSTALL httpfs", "INSTALL httpfs"), ("ATTACH '/tmp/x.duckdb'", "/tmp/x.duckdb")]:
        with pytest.raises(ReadOnlyQueryError, match="refused") as info:
            idx.query(sql)
        assert named in str(info.value)


def test_the_connection_itself_refuses_without_the_statement_guard(work: Work) -> None:
    """What the statement-type guard refuses, the locked read-only connection refuses too."""
    idx = Index(work.dir)
    with idx.connect(read_only=True) as con:
        for sql in ["INSTALL httpfs", "LOAD httpfs", "SET enable_external_access = true",
                    "SET allowed_paths = ['/etc/passwd']", "SET lock_configuration = false", "PRAGMA threads = 1",
                    "ATTACH '/tmp/x.duckdb'", f"COPY runs TO '{work.dir.parent / 'c.csv'}'",
                    "select * from read_text('/etc/hostname')", "select * from 'https://example.com/x.parquet'"]:
            start = time.monotonic()
            with pytest.raises(duckdb.Error):
                con.execute(sql).fetchall()
            assert time.monotonic() - start < QUICK_S, sql
        settings = dict(con.execute(
            "select name, value from duckdb_settings() where name in ('enable_external_access', 'lock_configuration', "
            "'autoload_known_extensions', 'autoinstall_known_extensions')").fetchall())
    assert settings == {"enable_external_access": "false", "lock_configuration": "true",
                        "autoload_known_extensions": "false", "autoinstall_known_extensions": "false"}
    assert not (work.dir.parent / "c.csv").exists()


def test_index_and_views_still_answer(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    idx = Index(work.dir)
    lens = work.cots.column("completion_len").to_pylist()
    assert idx.query("select count(*) from cots")[1] == [(work.cots.num_rows,)]
    cols, rows = idx.query("select run_id, name, status from runs")
    assert cols == ["run_id", "name", "status"] and rows == [("r1", "demo", "running")]
    _, joined = idx.query("select s.run_id, s.name, c.stage_key, count(*), sum(c.completion_len), max(c.prompt_id) "
                          "from cots c join stages s using (stage_key) group by all")
    assert joined == [("r1", "cots", "abc", len(lens), sum(lens), max(work.cots.column("prompt_id").to_pylist()))]
    shard = work.dir / "stages" / "cots" / "abc" / "part-00000.parquet"
    assert idx.query(f"select sum(completion_len) from read_parquet('{shard}')")[1] == [(sum(lens),)]  # a view's file
    assert idx.query("select ? + 1", [41])[1] == [(42,)]

    assert main(["--work-dir", str(work.dir), "sql", "select count(*), sum(completion_len) from cots"]) == EXIT_OK
    out = capsys.readouterr().out
    assert str(len(lens)) in out and str(sum(lens)) in out
    assert main(["--work-dir", str(work.dir), "sql",
                 "select r.name, sum(c.completion_len) from runs r join cots c on r.run_id = 'r1' group by r.name"]) \
        == EXIT_OK
    out = capsys.readouterr().out
    assert "demo" in out and str(sum(lens)) in out


def test_lock_does_not_leak_into_the_librarys_own_connections(work: Work) -> None:
    idx = Index(work.dir)
    with pytest.raises(ReadOnlyQueryError):
        idx.query("select * from read_text('/etc/hostname')")
    idx.create_run("r2", "again", {}, {}, "", 2)  # a write after a locked read
    with idx.connect() as con:
        assert con.execute("select current_setting('enable_external_access')").fetchall() == [(True,)]
    assert idx.query("select count(*) from runs")[1] == [(2,)]


def test_a_symlink_out_of_the_stages_folder_is_left_out_of_the_view(work: Work) -> None:
    evil = work.dir / "stages" / "cots" / "evil" / "part-00000.parquet"
    evil.parent.mkdir()
    evil.symlink_to(work.outside)
    inner = work.dir / "stages" / "cots" / "again" / "part-00000.parquet"  # a symlink inside stays
    inner.parent.mkdir()
    inner.symlink_to(work.dir / "stages" / "cots" / "abc" / "part-00000.parquet")
    idx = Index(work.dir)
    _, rows = idx.query("select stage_key, count(*) from cots group by all order by 1")
    assert rows == [("abc", work.cots.num_rows), ("again", work.cots.num_rows)]
    assert "evil" in idx.view_problems["cots"]
    with pytest.raises(ReadOnlyQueryError, match="refused"):
        idx.query(f"select * from read_parquet('{evil}')")


def test_errors_that_are_not_refusals_stay_duckdb_errors(work: Work, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(duckdb.CatalogException):
        Index(work.dir).query("select nonsense from nowhere")
    assert main(["--work-dir", str(work.dir), "sql", "select nonsense from nowhere"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_a_damaged_view_file_is_named_not_reported_as_a_missing_table(work: Work,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    shard = work.dir / "stages" / "cots" / "abc" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:40])  # truncated: no Parquet footer
    assert main(["--work-dir", str(work.dir), "sql", "select count(*) from cots"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "view(s) unavailable: cots:" in err and str(shard) in err and "rac verify" in err
    assert main(["--work-dir", str(work.dir), "sql", "select count(*) from runs"]) == EXIT_OK  # the rest works
    with pytest.raises(duckdb.CatalogException):  # a table that never existed is still DuckDB's own error
        Index(work.dir).query("select * from cotsx")
