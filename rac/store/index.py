"""DuckDB index of runs, stages, artifacts, per-layer pruning records, evaluations and standard-benchmark
(lm-eval) numbers (`rac.duckdb`).

Every table and view, column by column (meaning, unit, the library field it comes from), is documented in
docs/schema.md; `rac.store.schema.SCHEMA` is the one definition. A run is `run_id` and a stage cache key `stage_key`
in every table.

DuckDB lets one process at a time hold a file open for writing, so every call here opens a short-lived
connection, does its work (writes inside one transaction) and closes it; a busy file is retried until
`timeout_s`. Connections of one process are serialised by a lock (DuckDB refuses a read-only and a
read-write connection to one file inside one process).

Schema versions: the `meta` table holds `schema_version` (SCHEMA_VERSION). Tables without it are version 1
(before one vocabulary: `run`, `key`/`stage` holding stage keys, `error`, `damping`, `n`); the first
connection to such a file renames those columns in one transaction (`rac.store.schema.migrate`), and a
version-2 file gains `harness_results` the same way; a read-only connection first opens the file read-write
for that. Every read-only connection gets TEMP views over the stage Parquet
files under the work dir (the files `VIEW_GLOBS` matches): prompts, cots, calibration, eval_rows, each with
the files' own columns plus `stage_key` (the stage that wrote the file). It is then locked down
(`rac.store.sql.lock_down`): it reaches only the index file and those Parquet files, no other file, directory or URL,
loads and installs no extension, and changes no setting, so `rac sql` (`Index.query`) can read nothing
else on the machine and never tries the network.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from rac.store.artifacts import ArtifactRef
from rac.store.schema import SCHEMA_VERSION, HarnessRow, LayerRow, migrate, schema_version
from rac.store.sql import ReadOnlyQueryError, check_read_only, create_views, lock_down, refused

__all__ = ["INDEX_NAME", "Index", "IndexBusyError", "IndexSchemaError", "ReadOnlyQueryError"]

INDEX_NAME = "rac.duckdb"
_PROCESS_LOCK = threading.RLock()


class IndexBusyError(RuntimeError):
    """The index file stayed locked by another process for longer than the timeout."""


class IndexSchemaError(ValueError):
    """The index file has a schema this rac cannot use (a newer version, or an old one it cannot migrate)."""


def _now() -> datetime:
    return datetime.now()


def _is_lock_error(err: Exception) -> bool:
    text = str(err).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


class Index:
    """The DuckDB index in `work_dir / rac.duckdb`; every method uses its own short connection."""

    def __init__(self, work_dir: Path | str, timeout_s: float = 60.0) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.path = self.work_dir / INDEX_NAME
        self.timeout_s = timeout_s

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection with the schema and the Parquet views; writes should use `transaction`."""
        if read_only and not self.path.exists():
            raise FileNotFoundError(f"no index at {str(self.path)!r}: no run has been started in this work dir")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with _PROCESS_LOCK:
            con = self._open_current(read_only)
            try:
                if read_only:
                    files, self.view_problems = create_views(con, self.work_dir)
                    lock_down(con, files)
                yield con
            finally:
                con.close()

    def _open_current(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A connection to the file at SCHEMA_VERSION: an older file is migrated first (for a read-only
        connection, through a short read-write one)."""
        con = self._open(read_only)
        try:
            version = self._version(con)
            if version == SCHEMA_VERSION:
                return con
            if not read_only:
                migrate(con, version)
                return con
        except BaseException:
            con.close()
            raise
        con.close()
        self._migrate_for_read(version)
        return self._open(read_only)

    def _version(self, con: duckdb.DuckDBPyConnection) -> int:
        version = schema_version(con)
        if version > SCHEMA_VERSION:
            raise IndexSchemaError(f"index {self.path} has schema version {version}, newer than this rac's "
                                   f"{SCHEMA_VERSION}: use the rac that wrote it")
        return version

    def _migrate_for_read(self, version: int) -> None:
        try:
            self._open_current(read_only=False).close()
        except duckdb.Error as err:
            raise IndexSchemaError(
                f"index {self.path} has schema version {version} (this rac: {SCHEMA_VERSION}) and could not be "
                f"migrated: {str(err).splitlines()[0]}; run `rac --work-dir {self.work_dir} status` once as a "
                f"user who can write it") from err

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.timeout_s
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except (duckdb.IOException, duckdb.ConnectionException) as err:
                if not _is_lock_error(err) or time.monotonic() > deadline:
                    if _is_lock_error(err):
                        raise IndexBusyError(f"index {self.path} busy for {self.timeout_s}s: {err}") from err
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside BEGIN ... COMMIT (ROLLBACK on error)."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ---------------------------------------------------------------- queries
    def query(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run read-only SQL (SELECT/EXPLAIN only) and return (column names, rows). The connection is locked
        down (`rac.store.sql.lock_down`): a file, URL, extension or setting it would reach raises
        ReadOnlyQueryError."""
        check_read_only(sql)
        with self.connect(read_only=True) as con:
            try:
                cur = con.execute(sql, list(params))
                cols = [d[0] for d in cur.description or []]
                return cols, cur.fetchall()
            except duckdb.Error as err:
                translated = refused(err, sql, getattr(self, "view_problems", {}))
                if translated is err:
                    raise
                raise translated from err

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.connect() as con:
            cur = con.execute(sql, list(params))
            cols = [d[0] for d in cur.description or []]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    # ---------------------------------------------------------------- runs
    def create_run(self, run_id: str, name: str, config: dict[str, Any], fingerprint: dict[str, Any],
                   config_path: str, pid: int, status: str = "running") -> None:
        """Insert a new run row (status 'running', or 'starting' before the flow runs); an existing run id
        raises ValueError."""
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
                raise ValueError(f"run {run_id!r} already exists in {self.path}")
            now = _now()
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                [run_id, name, status, json.dumps(config), json.dumps(fingerprint), config_path, pid, now, now],
            )

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._fetch("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if not rows:
            return None
        row = rows[0]
        row["config"] = json.loads(row["config"])
        row["fingerprint"] = json.loads(row["fingerprint"])
        return row

    def list_runs(self) -> list[dict[str, Any]]:
        return self._fetch("SELECT run_id, name, status, created, updated, message FROM runs ORDER BY created")

    def set_run(self, run_id: str, status: str, message: str | None = None, pid: int | None = None,
                fingerprint: dict[str, Any] | None = None) -> None:
        """Update a run's status (and optionally message, pid, fingerprint)."""
        with self.transaction() as con:
            con.execute(
                "UPDATE runs SET status = ?, message = ?, pid = coalesce(?, pid), "
                "fingerprint = coalesce(?, fingerprint), updated = ? WHERE run_id = ?",
                [status, message, pid, json.dumps(fingerprint) if fingerprint else None, _now(), run_id],
            )

    # ---------------------------------------------------------------- stages
    def stage_started(self, run_id: str, name: str, stage: str, stage_key: str, config: dict[str, Any],
                      inputs: list[ArtifactRef]) -> None:
        """Record that a run started (or resumed) stage `name` with cache key `stage_key`."""
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?, 'running', false, ?, ?, NULL, NULL, ?, NULL, NULL)",
                [run_id, name, stage, stage_key, json.dumps(config), json.dumps([r.to_json() for r in inputs]), _now()],
            )

    def stage_done(self, run_id: str, name: str, stage_key: str, outputs: list[ArtifactRef],
                   summary: dict[str, Any], seconds: float, reused: bool) -> None:
        """Mark a stage done and record its output artifacts, in one transaction."""
        with self.transaction() as con:
            now = _now()
            for ref in outputs:
                _upsert_artifact(con, ref, stage_key, None, None, now)
            con.execute(
                "UPDATE stages SET status = 'done', reused = ?, outputs = ?, summary = ?, finished = ?, "
                "seconds = ? WHERE run_id = ? AND name = ?",
                [reused, json.dumps([r.to_json() for r in outputs]), json.dumps(summary, default=str),
                 now, seconds, run_id, name],
            )

    def stage_failed(self, run_id: str, name: str, message: str) -> None:
        with self.transaction() as con:
            con.execute(
                "UPDATE stages SET status = 'failed', summary = ?, finished = ? WHERE run_id = ? AND name = ?",
                [json.dumps({"error": message}), _now(), run_id, name],
            )

    def done_stages(self, stage_key: str) -> list[dict[str, Any]]:
        """Completed stage rows with cache key `stage_key` (any run), newest first, outputs decoded."""
        rows = self._fetch(
            "SELECT * FROM stages WHERE stage_key = ? AND status = 'done' ORDER BY finished DESC", [stage_key]
        )
        for row in rows:
            row["outputs"] = [ArtifactRef.from_json(o) for o in json.loads(row["outputs"])]
            row["summary"] = json.loads(row["summary"]) if row["summary"] else {}
        return rows

    def run_stages(self, run_id: str) -> list[dict[str, Any]]:
        return self._fetch(
            "SELECT name, stage, stage_key, status, reused, seconds, started, finished FROM stages "
            "WHERE run_id = ? ORDER BY started", [run_id]
        )

    # ---------------------------------------------------------------- artifacts
    def record_artifacts(self, refs: list[ArtifactRef], stage_key: str) -> None:
        """Insert or replace artifact rows (e.g. a finished CoT shard) in one transaction."""
        with self.transaction() as con:
            now = _now()
            for ref in refs:
                _upsert_artifact(con, ref, stage_key, None, None, now)

    def artifacts(self, stage_key: str, kind: str) -> list[ArtifactRef]:
        """Artifacts of a stage key with a given kind, by uri."""
        rows = self._fetch("SELECT * FROM artifacts WHERE stage_key = ? AND kind = ? ORDER BY uri",
                           [stage_key, kind])
        return [ArtifactRef(r["uri"], r["sha256"], r["bytes"], r["kind"]) for r in rows]

    def forget_artifacts(self, uris: list[str]) -> None:
        with self.transaction() as con:
            for uri in uris:
                con.execute("DELETE FROM artifacts WHERE uri = ?", [uri])

    # ---------------------------------------------------------------- layers
    def record_step(self, run_id: str, stage_key: str, layer: int, group: int, rows: list[LayerRow],
                    checkpoints: list[ArtifactRef], experts: Sequence[tuple[int, str, int]] = ()) -> None:
        """Write one (layer, group) step: its checkpoint artifacts, per-linear rows and, for a MoE layer,
        the routed tokens `experts` = (expert, segment, tokens) of the experts it pruned, in one transaction.

        Call only after the checkpoint files are fsynced and hashed.
        """
        with self.transaction() as con:
            now = _now()
            for ref in checkpoints:
                _upsert_artifact(con, ref, stage_key, layer, group, now)
            for r in rows:
                con.execute(
                    "INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, stage_key, r.layer, r.group, r.linear, r.sparsity, r.rel_error, r.loss,
                     r.damp, r.retries, r.seconds, now],
                )
            for expert, segment, tokens in experts:  # the gate/up and down steps of a layer count the same routing
                con.execute("INSERT OR REPLACE INTO expert_tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [run_id, stage_key, layer, expert, segment, tokens, now])

    def steps(self, stage_key: str) -> list[tuple[int, int, list[ArtifactRef]]]:
        """Recorded (layer, group, checkpoint artifacts) of a prune stage, in step order."""
        done = self._fetch(
            'SELECT DISTINCT layer, "group" FROM layers WHERE stage_key = ? ORDER BY layer, "group"', [stage_key]
        )
        arts = self._fetch(
            'SELECT * FROM artifacts WHERE stage_key = ? AND layer IS NOT NULL', [stage_key]
        )
        out = []
        for d in done:
            refs = [ArtifactRef(a["uri"], a["sha256"], a["bytes"], a["kind"]) for a in arts
                    if a["layer"] == d["layer"] and a["group"] == d["group"]]
            out.append((int(d["layer"]), int(d["group"]), refs))
        return out

    def forget_steps(self, stage_key: str, start: tuple[int, int] | None = None) -> None:
        """Delete the layer rows and checkpoint artifacts of a prune stage from step `start` on (all if None)."""
        layer, group = start if start is not None else (-1, -1)
        cond = 'stage_key = ? AND (layer > ? OR (layer = ? AND "group" >= ?))'
        with self.transaction() as con:
            con.execute(f"DELETE FROM layers WHERE {cond}", [stage_key, layer, layer, group])
            con.execute("DELETE FROM expert_tokens WHERE stage_key = ? AND (layer > ? OR (layer = ? AND ? = 0))",
                        [stage_key, layer, layer, group])  # mid-layer resume: later steps rewrite the same counts
            con.execute(f"DELETE FROM artifacts WHERE layer IS NOT NULL AND {cond}",
                        [stage_key, layer, layer, group])

    def forget_checkpoints(self, stage_key: str) -> None:
        """Delete the checkpoint artifact rows of a finished prune stage (its files are deleted); the layer
        rows stay: they are the stage's per-linear record."""
        with self.transaction() as con:
            con.execute("DELETE FROM artifacts WHERE stage_key = ? AND layer IS NOT NULL", [stage_key])

    def layer_rows(self, stage_key: str) -> list[dict[str, Any]]:
        return self._fetch('SELECT * FROM layers WHERE stage_key = ? ORDER BY layer, "group", linear', [stage_key])

    def expert_tokens(self, stage_key: str) -> list[dict[str, Any]]:
        """Routed calibration tokens per (layer, expert, segment) of a prune stage (MoE models)."""
        return self._fetch("SELECT layer, expert, segment, tokens FROM expert_tokens WHERE stage_key = ? "
                           "ORDER BY layer, expert, segment", [stage_key])

    # ---------------------------------------------------------------- evals
    def record_eval(self, run_id: str, label: str, stage_key: str, row: dict[str, Any]) -> None:
        """Insert or replace the evaluation summary of model `label` in a run."""
        cols = ["model", "calibration", "method", "sparsity", "n_problems", "accuracy", "ci_low", "ci_high",
                "mean_tokens", "median_tokens", "p90_tokens", "runaway_share", "wall_s", "tokens_per_s"]
        self._upsert_metrics("evals", run_id, label, stage_key, [row.get(c) for c in cols], row)

    def evals(self, run_id: str) -> list[dict[str, Any]]:
        return self._fetch("SELECT * FROM evals WHERE run_id = ? ORDER BY created", [run_id])

    def record_proxies(self, run_id: str, label: str, stage_key: str, row: dict[str, Any],
                       recon: dict[str, Any]) -> None:
        """Insert or replace the proxies of pruned model `label` in a run (recon: a token-error summary)."""
        cols = ["calibration", "method", "sparsity", "dense_nll", "pruned_nll", "nll_gap", "top1_agreement",
                "kl", "n_positions"]
        values = [row.get(c) for c in cols] + [recon.get("prompt_mean"), recon.get("decode_mean")]
        self._upsert_metrics("proxies", run_id, label, stage_key, values, row)

    def proxies(self, run_id: str) -> list[dict[str, Any]]:
        return self._fetch("SELECT * FROM proxies WHERE run_id = ? ORDER BY created", [run_id])

    # ---------------------------------------------------------------- standard benchmarks
    def record_harness(self, run_id: str, label: str, stage_key: str, rows: Sequence[HarnessRow],
                       config: dict[str, Any]) -> None:
        """Insert or replace the benchmark rows of model `label` in a run (keyed by harness, backend, task,
        metric, filter), in one transaction; `config` is the harness stage config the key hashes."""
        with self.transaction() as con:
            now = _now()
            for r in rows:
                con.execute(
                    "INSERT OR REPLACE INTO harness_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, label, stage_key, r.harness, r.harness_version, r.backend, r.task, r.metric, r.filter,
                     r.value, r.stderr, r.n, r.n_total, r.num_fewshot, r.higher_is_better, r.model,
                     json.dumps(config), now],
                )

    def harness_results(self, run_id: str) -> list[dict[str, Any]]:
        return self._fetch("SELECT * FROM harness_results WHERE run_id = ? ORDER BY label, task, metric, filter",
                           [run_id])

    def _upsert_metrics(self, table: str, run_id: str, label: str, stage_key: str, values: list[Any],
                        row: dict[str, Any]) -> None:
        """One (run_id, label) row of a metrics table: keys, the typed columns, the whole row as JSON."""
        with self.transaction() as con:
            con.execute(
                f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, {', '.join('?' * len(values))}, ?, ?)",
                [run_id, label, stage_key, *values, json.dumps(row, default=str), _now()],
            )


def _upsert_artifact(con: duckdb.DuckDBPyConnection, ref: ArtifactRef, stage_key: str, layer: int | None,
                     group: int | None, now: datetime) -> None:
    con.execute(
        "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [ref.uri, ref.kind, ref.sha256, ref.bytes, stage_key, layer, group, now],
    )
