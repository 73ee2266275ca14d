"""The index schema, its version, and the migration of files written by an older rac.

Version 2 is one vocabulary with the library: `run_id` and `stage_key` in every table, `rel_error` and
`damp` as in `rac.engine.checkpoint.LinearRecord` (columns documented in docs/schema.md). A file without
the `meta` table is version 1 (the column names before); `migrate` renames in one transaction.
Version 3 adds the table `harness_results` (lm-eval numbers, `rac eval RUN --harness lm-eval`); a version-2
file gains it, empty, in the same one-transaction `migrate` (every other table and row is kept as it is).
Version 4 adds `expert_tokens` (per layer, expert and segment, the calibration tokens the router sent there).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
  run_id VARCHAR PRIMARY KEY, name VARCHAR, status VARCHAR, config JSON, fingerprint JSON,
  config_path VARCHAR, pid INTEGER, message VARCHAR, created TIMESTAMP, updated TIMESTAMP);
CREATE TABLE IF NOT EXISTS stages (
  run_id VARCHAR, name VARCHAR, stage VARCHAR, stage_key VARCHAR, status VARCHAR, reused BOOLEAN,
  config JSON, inputs JSON, outputs JSON, summary JSON, started TIMESTAMP, finished TIMESTAMP,
  seconds DOUBLE, PRIMARY KEY (run_id, name));
CREATE TABLE IF NOT EXISTS artifacts (
  uri VARCHAR PRIMARY KEY, kind VARCHAR, sha256 VARCHAR, bytes BIGINT, stage_key VARCHAR,
  layer INTEGER, "group" INTEGER, created TIMESTAMP);
CREATE TABLE IF NOT EXISTS layers (
  run_id VARCHAR, stage_key VARCHAR, layer INTEGER, "group" INTEGER, linear VARCHAR, sparsity DOUBLE,
  rel_error DOUBLE, loss DOUBLE, damp DOUBLE, retries INTEGER, seconds DOUBLE, created TIMESTAMP,
  PRIMARY KEY (stage_key, layer, "group", linear));
CREATE TABLE IF NOT EXISTS evals (
  run_id VARCHAR, label VARCHAR, stage_key VARCHAR, model VARCHAR, calibration VARCHAR, method VARCHAR,
  sparsity DOUBLE, n_problems INTEGER, accuracy DOUBLE, ci_low DOUBLE, ci_high DOUBLE, mean_tokens DOUBLE,
  median_tokens DOUBLE, p90_tokens DOUBLE, runaway_share DOUBLE, wall_s DOUBLE, tokens_per_s DOUBLE,
  metrics JSON, created TIMESTAMP, PRIMARY KEY (run_id, label));
CREATE TABLE IF NOT EXISTS proxies (
  run_id VARCHAR, label VARCHAR, stage_key VARCHAR, calibration VARCHAR, method VARCHAR, sparsity DOUBLE,
  dense_nll DOUBLE, pruned_nll DOUBLE, nll_gap DOUBLE, top1_agreement DOUBLE, kl DOUBLE,
  n_positions INTEGER, recon_prompt DOUBLE, recon_decode DOUBLE, metrics JSON, created TIMESTAMP,
  PRIMARY KEY (run_id, label));
CREATE TABLE IF NOT EXISTS harness_results (
  run_id VARCHAR, label VARCHAR, stage_key VARCHAR, harness VARCHAR, harness_version VARCHAR, backend VARCHAR,
  task VARCHAR, metric VARCHAR, filter VARCHAR, value DOUBLE, stderr DOUBLE, n INTEGER, n_total INTEGER,
  num_fewshot INTEGER, higher_is_better BOOLEAN, model VARCHAR, config JSON, created TIMESTAMP,
  PRIMARY KEY (run_id, label, harness, backend, task, metric, filter));
"""
# Version 4: the table `expert_tokens` (calibration tokens the router sent to
# each expert, per layer and segment; written with the prune step that pruned the expert's linears).
EXPERT_TOKENS_VERSION = 4
EXPERT_TOKENS_DDL = """
CREATE TABLE IF NOT EXISTS expert_tokens (
  run_id VARCHAR, stage_key VARCHAR, layer INTEGER, expert INTEGER, segment VARCHAR, tokens BIGINT,
  created TIMESTAMP, PRIMARY KEY (stage_key, layer, expert, segment));
"""

@dataclass(frozen=True)
class LayerRow:
    """One pruned linear of one (layer, group) step."""

    layer: int
    group: int
    linear: str
    sparsity: float
    rel_error: float  # LinearRecord.rel_error
    loss: float
    damp: float  # LinearRecord.damp
    retries: int
    seconds: float


@dataclass(frozen=True)
class HarnessRow:
    """One standard-benchmark number of one model (`rac.eval.harness.HarnessMetric` plus where it came from)."""

    harness: str  # "lm-eval"
    harness_version: str
    backend: str  # "hf" | "vllm"
    task: str
    metric: str
    filter: str
    value: float | None
    stderr: float | None
    n: int | None
    n_total: int | None
    num_fewshot: int | None
    higher_is_better: bool | None
    model: str  # the evaluated model folder


# version 1 -> 2, per table: (old column, new column)
RENAMES_V1: dict[str, tuple[tuple[str, str], ...]] = {
    "stages": (("key", "stage_key"),),
    "artifacts": (("stage", "stage_key"),),
    "layers": (("run", "run_id"), ("stage", "stage_key"), ("error", "rel_error"), ("damping", "damp")),
    "evals": (("run", "run_id"), ("stage", "stage_key"), ("n", "n_problems")),
    "proxies": (("run", "run_id"), ("stage", "stage_key")),
}

_MAIN = "database_name = current_database() AND schema_name = 'main'"


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version of an open index: `meta.schema_version`; 1 for tables without it, 0 for none."""
    tables = {str(t) for (t,) in con.execute(f"SELECT table_name FROM duckdb_tables() WHERE {_MAIN}").fetchall()}
    if "meta" in tables:
        row = con.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        if row is not None:
            return int(row[0])
    return 1 if tables else 0


def migrate(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Bring the file of a read-write connection from `version` to SCHEMA_VERSION in one transaction: rename
    the version-1 columns present (DuckDB renames primary-key columns in place), create the missing tables
    (version 2 -> 3: `harness_results`; 3 -> 4: `expert_tokens`), record the version."""
    con.execute("BEGIN TRANSACTION")
    try:
        if version == 1:
            _rename_v1(con)
        con.execute(SCHEMA)
        if version < EXPERT_TOKENS_VERSION:  # a new file gets it too
            con.execute(EXPERT_TOKENS_DDL)
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _rename_v1(con: duckdb.DuckDBPyConnection) -> None:
    columns: dict[str, set[str]] = {}
    for table, column in con.execute(f"SELECT table_name, column_name FROM duckdb_columns() WHERE {_MAIN}").fetchall():
        columns.setdefault(str(table), set()).add(str(column))
    for table, renames in RENAMES_V1.items():
        for old, new in renames:
            if old in columns.get(table, set()):
                con.execute(f'ALTER TABLE {table} RENAME COLUMN "{old}" TO {new}')
