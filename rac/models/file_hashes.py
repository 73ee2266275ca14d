"""A persistent cache of file sha256s, so a large model folder is read in full once until a file changes.

One sqlite file, ``<rac cache>/file-hashes.sqlite`` (`rac.models.assets.cache_dir`), holds one row per
absolute (symlink-resolved) path: the sha256 of its bytes and the stat it was taken under — size,
mtime_ns, ctime_ns, inode and device. A lookup hits only when all five still match the file's current
stat; anything else re-hashes (with `rac.store.artifacts.sha256_file`) and replaces the row.

- In-place writes change mtime and ctime; replacing the file (copy, rename over, re-export) changes the
  inode. ctime cannot be set from user space, so even a write that restores size and mtime with
  `os.utime` misses. Out of scope: a change that also restores ctime (a system clock set back, or raw
  edits of the block device) — delete the cache file after such a thing.
- Racy writes: a file whose ctime is less than `RACY_WINDOW_NS` before the hash started is hashed but not
  stored (a second write within the same timestamp tick would keep every stat field equal), and neither
  is one whose stat changed while it was read. Freshly written models are therefore hashed again on the
  next call, then cached.
- Concurrency: sqlite transactions with a busy timeout; several processes may read and write at once.
- A cache file that is not an intact sqlite database of this layout is deleted and rebuilt; if that fails
  too, or the cache stays locked past the busy timeout, hashes are computed without a cache. A row is only ever trusted when every stat field
  matches and its hash is 64 hex digits.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from rac.store import artifacts

CACHE_NAME = "file-hashes.sqlite"
RACY_WINDOW_NS = 2_000_000_000
_BUSY_TIMEOUT_S = 60.0
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SCHEMA = ("CREATE TABLE IF NOT EXISTS file_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
           "mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, "
           "device INTEGER NOT NULL, sha256 TEXT NOT NULL, hashed_at REAL NOT NULL)")
_COLUMNS = ["path", "size", "mtime_ns", "ctime_ns", "inode", "device", "sha256", "hashed_at"]
_StatKey = tuple[int, int, int, int, int]


def cache_path() -> Path:
    """Where the hash cache lives: ``<rac cache>/file-hashes.sqlite``."""
    from rac.models.assets import cache_dir

    return cache_dir() / CACHE_NAME


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(db), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute(_SCHEMA)
        cols = [row[1] for row in conn.execute("PRAGMA table_info(file_hashes)")]
        if cols != _COLUMNS:
            raise sqlite3.DatabaseError(f"unexpected file_hashes columns {cols}")
        if conn.execute("PRAGMA quick_check").fetchone() != ("ok",):
            raise sqlite3.DatabaseError("quick_check failed")
    except BaseException:
        conn.close()
        raise
    return conn


def _open(db: Path) -> sqlite3.Connection | None:
    """A connection to the cache, or None (no caching) when it is busy or cannot be opened.

    A file that is not an intact sqlite database of this layout is deleted (with its journal) and rebuilt."""
    try:
        return _connect(db)
    except sqlite3.OperationalError:  # locked past the timeout, or the folder is not writable
        return None
    except sqlite3.DatabaseError:  # not a database, malformed, or another layout
        pass
    for stale in (db, db.with_name(db.name + "-journal")):
        with contextlib.suppress(OSError):
            stale.unlink()
    try:
        return _connect(db)
    except sqlite3.Error:
        return None


@contextlib.contextmanager
def _cache() -> Iterator[sqlite3.Connection | None]:
    try:
        db = cache_path()
    except OSError:  # no writable cache folder: hash without a cache
        db = None
    conn = _open(db) if db is not None else None
    try:
        yield conn
    finally:
        if conn is not None:
            conn.close()


def _lookup(conn: sqlite3.Connection | None, path: str, key: _StatKey) -> str | None:
    if conn is None:
        return None
    try:
        row = conn.execute("SELECT size, mtime_ns, ctime_ns, inode, device, sha256 FROM file_hashes "
                           "WHERE path = ?", (path,)).fetchone()
    except sqlite3.Error:
        return None
    if row is None or tuple(row[:5]) != key or not isinstance(row[5], str) or not _HEX64.fullmatch(row[5]):
        return None
    return row[5]


def _store(conn: sqlite3.Connection | None, path: str, key: _StatKey, digest: str) -> None:
    if conn is None:
        return
    with contextlib.suppress(sqlite3.Error):  # a cache that cannot be written only costs a re-hash later
        conn.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (path, *key, digest, time.time()))


def _hash(conn: sqlite3.Connection | None, file: Path) -> str:
    path = str(Path(file).resolve())
    started = time.time_ns()
    before = _stat_key(os.stat(path))
    cached = _lookup(conn, path, before)
    if cached is not None:
        return cached
    digest = artifacts.sha256_file(path)
    after = os.stat(path)
    if _stat_key(after) == before and after.st_ctime_ns < started - RACY_WINDOW_NS:
        _store(conn, path, before, digest)
    return digest


def sha256_cached(file: Path | str) -> str:
    """Hex sha256 of one file's bytes, from the cache when its stat is unchanged since it was hashed."""
    with _cache() as conn:
        return _hash(conn, Path(file))


def sha256_files(files: list[Path]) -> list[str]:
    """Hex sha256 of each file (in order), through one connection to the cache."""
    with _cache() as conn:
        return [_hash(conn, f) for f in files]
