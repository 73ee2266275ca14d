"""DuckDB index: tables, transactions, Parquet views and the read-only query guard."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.store.artifacts import ArtifactRef
from rac.store.index import SCHEMA_VERSION, Index, IndexSchemaError, LayerRow, ReadOnlyQueryError


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
    cols, rows = idx.query("SELECT uri, sha256, bytes, stage_key FROM artifacts")
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
        table = pa.table({"prompt_id": list(range(len(lens))), "completion_len": lens})
        path = tmp_path / "stages" / "cots" / "key1" / f"part-{shard:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, str(path))
    flat = [n for lens in lengths for n in lens]
    cols, rows = idx.query("select count(*), avg(completion_len), min(stage_key) from cots")
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


# the schema before one vocabulary (`git show HEAD~1:rac/index.py`): version 1, no meta table
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id VARCHAR PRIMARY KEY, name VARCHAR, status VARCHAR, config JSON, fingerprint JSON,
  config_path VARCHAR, pid INTEGER, message VARCHAR, created TIMESTAMP, updated TIMESTAMP);
CREATE TABLE IF NOT EXISTS stages (
  run_id VARCHAR, name VARCHAR, stage VARCHAR, key VARCHAR, status VARCHAR, reused BOOLEAN,
  config JSON, inputs JSON, outputs JSON, summary JSON, started TIMESTAMP, finished TIMESTAMP,
  seconds DOUBLE, PRIMARY KEY (run_id, name));
CREATE TABLE IF NOT EXISTS artifacts (
  uri VARCHAR PRIMARY KEY, kind VARCHAR, sha256 VARCHAR, bytes BIGINT, stage VARCHAR,
  layer INTEGER, "group" INTEGER, created TIMESTAMP);
CREATE TABLE IF NOT EXISTS layers (
  run VARCHAR, stage VARCHAR, layer INTEGER, "group" INTEGER, linear VARCHAR, sparsity DOUBLE,
  error DOUBLE, loss DOUBLE, damping DOUBLE, retries INTEGER, seconds DOUBLE, created TIMESTAMP,
  PRIMARY KEY (stage, layer, "group", linear));
CREATE TABLE IF NOT EXISTS evals (
  run VARCHAR, label VARCHAR, stage VARCHAR, model VARCHAR, calibration VARCHAR, method VARCHAR,
  sparsity DOUBLE, n INTEGER, accuracy DOUBLE, ci_low DOUBLE, ci_high DOUBLE, mean_tokens DOUBLE,
  median_tokens DOUBLE, p90_tokens DOUBLE, runaway_share DOUBLE, wall_s DOUBLE, tokens_per_s DOUBLE,
  metrics JSON, created TIMESTAMP, PRIMARY KEY (run, label));
CREATE TABLE IF NOT EXISTS proxies (
  run VARCHAR, label VARCHAR, stage VARCHAR, calibration VARCHAR, method VARCHAR, sparsity DOUBLE,
  dense_nll DOUBLE, pruned_nll DOUBLE, nll_gap DOUBLE, top1_agreement DOUBLE, kl DOUBLE,
  n_positions INTEGER, recon_prompt DOUBLE, recon_decode DOUBLE, metrics JSON, created TIMESTAMP,
  PRIMARY KEY (run, label));
"""


def _old_index(work: Path) -> tuple[ArtifactRef, ArtifactRef]:
    """A work dir whose rac.duckdb was written by the version-1 schema: one row per table, one CoT shard."""
    model = _ref(work / "stages" / "prune" / "kp" / "model" / "model.safetensors", b"weights", "model")
    ckpt = _ref(work / "stages" / "prune" / "kp" / "work" / "step-0-0.safetensors", b"ck", "ckpt-weights")
    shard = work / "stages" / "cots" / "kc" / "part-00000.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.table({"prompt_id": ["p0", "p1"], "completion_len": [3, 9]}), str(shard))
    con = duckdb.connect(str(work / "rac.duckdb"))
    con.execute(OLD_SCHEMA)
    con.execute("INSERT INTO runs VALUES ('r1', 'demo', 'done', '{}', '{}', 'c.yaml', 7, NULL, now(), now())")
    con.execute("INSERT INTO stages VALUES ('r1', 'prune/rac-50', 'prune', 'kp', 'done', false, '{}', '[]', ?, "
                "'{\"n_tokens\": 64}', now(), now(), 2.5)", [json.dumps([model.to_json()])])
    for ref, layer, group in ((model, None, None), (ckpt, 0, 0)):
        con.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?, 'kp', ?, ?, now())",
                    [ref.uri, ref.kind, ref.sha256, ref.bytes, layer, group])
    con.execute("INSERT INTO layers VALUES ('r1', 'kp', 0, 0, 'q_proj', 0.5, 0.125, 3.0, 0.01, 1, 0.2, now())")
    con.execute("INSERT INTO evals VALUES ('r1', 'rac-50', 'ke', 'rac-50', 'rac', 'sparsegpt', 0.5, 20, 0.4, 0.2, "
                "0.6, 100, 90, 180, 0.25, 12, 50, '{}', now())")
    con.execute("INSERT INTO proxies VALUES ('r1', 'rac-50', 'kx', 'rac', 'sparsegpt', 0.5, 1.0, 1.5, 0.5, 0.8, "
                "0.3, 40, 0.01, 0.02, '{}', now())")
    con.close()
    return model, ckpt


@pytest.mark.parametrize("first", ["read", "write"])
def test_old_index_is_migrated_once_and_keeps_every_row(tmp_path: Path, first: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from rac_prefect.flows.cli import EXIT_OK, main

    model, ckpt = _old_index(tmp_path)
    idx = Index(tmp_path)
    if first == "read":  # `rac sql` before any write migrates through a short read-write connection
        assert main(["--work-dir", str(tmp_path), "sql", "select rel_error, damp from layers"]) == EXIT_OK
        assert "0.125" in capsys.readouterr().out
    else:
        assert [r["run_id"] for r in idx.list_runs()] == ["r1"]
    assert idx.query("SELECT value FROM meta WHERE name = 'schema_version'")[1] == [(str(SCHEMA_VERSION),)]
    assert idx.query("SELECT run_id, name, stage, stage_key, status, seconds FROM stages")[1] == \
        [("r1", "prune/rac-50", "prune", "kp", "done", 2.5)]
    done = idx.done_stages("kp")
    assert len(done) == 1 and done[0]["outputs"] == [model] and done[0]["summary"] == {"n_tokens": 64}
    assert idx.artifacts("kp", "model") == [model] and idx.steps("kp") == [(0, 0, [ckpt])]
    layer = {k: v for k, v in idx.layer_rows("kp")[0].items() if k != "created"}
    assert layer == {"run_id": "r1", "stage_key": "kp", "layer": 0, "group": 0, "linear": "q_proj", "sparsity": 0.5,
                     "rel_error": 0.125, "loss": 3.0, "damp": 0.01, "retries": 1, "seconds": 0.2}
    ev, px = idx.evals("r1"), idx.proxies("r1")
    assert [(e["run_id"], e["label"], e["stage_key"], e["n_problems"], e["runaway_share"]) for e in ev] == \
        [("r1", "rac-50", "ke", 20, 0.25)]
    assert [(p["run_id"], p["stage_key"], p["n_positions"], p["recon_decode"]) for p in px] == [("r1", "kx", 40, 0.02)]
    assert idx.query("SELECT count(*), sum(completion_len), min(stage_key) FROM cots")[1] == [(2, 12, "kc")]
    for old in ("SELECT error FROM layers", "SELECT key FROM stages", "SELECT run FROM evals", "SELECT n FROM evals"):
        with pytest.raises(duckdb.BinderException):
            idx.query(old)
    # the renamed primary key still keys the rows: the same step replaces its row instead of adding one
    idx.record_step("r1", "kp", 0, 0, [LayerRow(0, 0, "q_proj", 0.5, 0.25, 3.0, 0.02, 0, 0.1)], [ckpt])
    assert [(r["rel_error"], r["damp"]) for r in idx.layer_rows("kp")] == [(0.25, 0.02)]
    idx.record_eval("r1", "rac-50", "ke", {"n_problems": 30})
    assert [e["n_problems"] for e in idx.evals("r1")] == [30]


def test_index_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    idx = Index(tmp_path)
    idx.create_run("r1", "demo", {}, {}, "", 1)
    with idx.transaction() as con:
        con.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    for call in (idx.list_runs, lambda: idx.query("select 1")):
        with pytest.raises(IndexSchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
            call()
