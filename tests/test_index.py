"""DuckDB index: tables, transactions, Parquet views and the read-only query guard."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.store.artifacts import ArtifactRef
from rac.store.index import Index, LayerRow, ReadOnlyQueryError


def _ref(path: Path, body: bytes, kind: str = "blob") -> ArtifactRef:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return ArtifactRef.of(path, kind=kind)


def test_run_and_stage_rows(tmp_path: Path) -> None:
    idx = Index(tmp_path)
    idx.create_run("r1", "demo", {"a": 1}, {"model_revision": "m"}, "cfg.yaml", 123)
    with pytest.raises(ValueError, match="r1"):
        idx.create_run("r1", "demo", {}, {}, "", 1)
    run = idx.get_run("r1")
    assert run is not None and run["config"] == {"a": 1} and run["status"] == "running"
    out = _ref(tmp_path / "stages" / "prompts" / "k1" / "prompts.parquet", b"data")
    idx.stage_started("r1", "prompts", "prompts", "k1", {"n": 2}, [])
    assert idx.done_stages("k1") == []
    idx.stage_done("r1", "prompts", "k1", [out], {"rows": 2}, 1.5, reused=False)
    done = idx.done_stages("k1")
    assert len(done) == 1 and done[0]["outputs"] == [out] and done[0]["summary"] == {"rows": 2}
    idx.set_run("r1", "done", message="ok")
    assert idx.get_run("r1")["status"] == "done"  # type: ignore[index]
    cols, rows = idx.query("SELECT uri, sha256, bytes, stage FROM artifacts")
    assert rows == [(out.uri, out.sha256, 4, "k1")]


def test_steps_record_and_forget(tmp_path: Path) -> None:
    idx = Index(tmp_path)
    for layer in range(2):
        for group in range(2):
            ck = _ref(tmp_path / f"ck-{layer}-{group}.pt", f"{layer}{group}".encode())
            rows = [LayerRow(layer, group, f"lin{i}", 0.5, 0.1 * i, 1.0, 0.01, 0, 0.2) for i in range(2)]
            idx.record_step("r1", "pk", layer, group, rows, [ck])
    steps = idx.steps("pk")
    assert [(s[0], s[1]) for s in steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(s[2]) == 1 and s[2][0].check() is None for s in steps)
    assert len(idx.layer_rows("pk")) == 8
    idx.forget_steps("pk", (0, 1))
    assert [(s[0], s[1]) for s in idx.steps("pk")] == [(0, 0)]
    _, n_art = idx.query("SELECT count(*) FROM artifacts WHERE layer IS NOT NULL")
    assert n_art == [(1,)]


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    idx = Index(tmp_path)
    bad = LayerRow(0, 0, "q", 0.5, 0.1, 1.0, 0.01, 0, 0.1)
    with pytest.raises(RuntimeError):
        with idx.transaction() as con:
            con.execute("INSERT INTO layers VALUES ('r', 'k', 0, 0, 'q', .5, .1, 1, .01, 0, .1, now())")
            raise RuntimeError("crash between rows")
    assert idx.layer_rows("k") == []
    idx.record_step("r", "k", 0, 0, [bad], [])
    assert len(idx.layer_rows("k")) == 1


def test_views_over_parquet_and_sql_guard(tmp_path: Path) -> None:
    idx = Index(tmp_path)
    idx.create_run("r1", "demo", {}, {}, "", 1)
    lengths = [[5, 7, 9], [11]]
    for shard, lens in enumerate(lengths):
        table = pa.table({"prompt_id": list(range(len(lens))),
                          "completion_ids": [list(range(n)) for n in lens]})
        path = tmp_path / "stages" / "cots" / "key1" / f"part-{shard:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, str(path))
    flat = [n for lens in lengths for n in lens]
    cols, rows = idx.query("select count(*), avg(n_decode), min(stage_key) from cots")
    assert rows == [(len(flat), sum(flat) / len(flat), "key1")]
    for stmt in ("delete from runs", "insert into runs (run_id) values ('x')",
                 "copy (select 1) to 'x.csv'", "select 1; drop table runs", "attach 'y.db'"):
        with pytest.raises(ReadOnlyQueryError, match="read-only"):
            idx.query(stmt)
    assert idx.get_run("r1") is not None


def test_query_without_index_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no index"):
        Index(tmp_path).query("select 1")


def test_busy_file_is_retried_until_free(tmp_path: Path) -> None:
    idx = Index(tmp_path)
    idx.create_run("r1", "demo", {}, {}, "", 1)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb, time, sys; c = duckdb.connect({str(idx.path)!r}); print('held', flush=True); "
         "time.sleep(1.5); c.close()"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    idx.set_run("r1", "done")  # waits for the other process to let go
    assert time.monotonic() - t0 > 0.3
    holder.wait()
    assert idx.get_run("r1")["status"] == "done"  # type: ignore[index]
    with pytest.raises(duckdb.Error):
        with idx.connect(read_only=True) as con:
            con.execute("INSERT INTO runs (run_id) VALUES ('y')")
