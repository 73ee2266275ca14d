"""Atomic Parquet writes and schema-metadata reads shared by the data stages (on `rac.store.artifacts`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rac.store.artifacts import atomic_path

__all__ = ["atomic_write_table", "read_table_meta"]


def atomic_write_table(table: pa.Table, out_path: Path) -> None:
    """Write `table` to a temp file beside `out_path`, fsync, then rename it into place (never half-written)."""
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)


def read_table_meta(path: Path, key: bytes) -> dict[str, Any]:
    """The JSON stored under schema-metadata `key` of a Parquet file; ValueError when absent."""
    meta = pq.read_schema(path).metadata or {}
    if key not in meta:
        raise ValueError(f"{path} has no {key.decode()!r} schema metadata (not written by this stage?)")
    return dict(json.loads(meta[key]))
