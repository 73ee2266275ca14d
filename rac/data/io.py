"""Atomic Parquet writes and schema-metadata reads shared by the data stages."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_table(table: pa.Table, out_path: Path) -> None:
    """Write `table` to a temp file beside `out_path`, then rename it into place (never half-written)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, out_path: Path) -> None:
    """Write text via a temp file + rename."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_table_meta(path: Path, key: bytes) -> dict[str, Any]:
    """The JSON stored under schema-metadata `key` of a Parquet file; ValueError when absent."""
    meta = pq.read_schema(path).metadata or {}
    if key not in meta:
        raise ValueError(f"{path} has no {key.decode()!r} schema metadata (not written by this stage?)")
    return dict(json.loads(meta[key]))
