"""`rac sql`'s reach: TEMP views over the stage Parquet files, and a connection locked down to them.

The views (`VIEW_GLOBS`) read explicit lists of the files their globs match when the connection opens;
`lock_down` then leaves the connection reaching only its database file and those files: no other file,
directory or URL, no extension loaded or installed on demand, and no setting changed afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb

# view name -> glob (relative to the work dir) of the Parquet files it reads
VIEW_GLOBS: dict[str, str] = {
    "prompts": "stages/prompts/*/prompts.parquet",
    "cots": "stages/cots/*/part-*.parquet",
    "calibration": "stages/calib/*/calib.parquet",
    "eval_rows": "stages/eval/*/rows.parquet",
}
READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
_GLOB_CHARS = "*?["  # what DuckDB takes for a glob in a path


class ReadOnlyQueryError(ValueError):
    """A statement other than SELECT/EXPLAIN was given to a read-only query, or it reached past its views."""


def check_read_only(sql: str) -> None:
    """Refuse an empty query and any statement but SELECT/EXPLAIN, naming the first offending statement."""
    statements = duckdb.extract_statements(sql)
    if not statements:
        raise ReadOnlyQueryError(f"empty query: {sql!r}")
    for st in statements:
        kind = st.type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise ReadOnlyQueryError(f"refused {kind} statement {st.query.strip()[:80]!r}: `rac sql` is read-only "
                                     f"(allowed: {sorted(READ_ONLY_STATEMENTS)})")


def refused(err: duckdb.Error, sql: str, view_problems: Mapping[str, str]) -> Exception:
    """What a failed read-only query raises: a ReadOnlyQueryError when the locked-down connection refused a
    file, URL, extension or setting, or the query named a view left out (`view_problems`); else `err`."""
    if isinstance(err, duckdb.CatalogException):
        broken = [f"{v}: {p}" for v, p in view_problems.items() if re.search(rf"\b{v}\b", sql)]
        if not broken:
            return err
        return ReadOnlyQueryError(f"view(s) unavailable: {'; '.join(broken)} (a damaged stage file: "
                                  f"`rac verify` lists them, the next run recomputes them)")
    if isinstance(err, (duckdb.PermissionException, duckdb.InvalidInputException)):
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, duckdb.InvalidInputException) and "configuration has been locked" not in first:
            return err
        return ReadOnlyQueryError(f"refused: {first} (`rac sql` reads only the index tables and the stage Parquet "
                                  f"views {', '.join(VIEW_GLOBS)}; no other file, URL, extension or setting)")
    return err


def create_views(con: duckdb.DuckDBPyConnection, work_dir: Path) -> tuple[list[str], dict[str, str]]:
    """TEMP views over the stage Parquet files of `work_dir`: (the files they read, why views were left out). Each view reads the explicit
    list of files its glob matches now; a file that resolves outside the work dir's `stages` folder (a
    symlink out) or whose name holds a glob character is left out, and a view whose files cannot be
    read is left out, with the reason."""
    problems: dict[str, str] = {}
    root = (work_dir / "stages").resolve()
    used: list[str] = []
    for name, pattern in VIEW_GLOBS.items():
        files: list[str] = []
        for path in sorted(work_dir.glob(pattern)):
            if any(c in str(path) for c in _GLOB_CHARS):
                problems[name] = f"left out {str(path)!r}: glob character in its name"
            elif not path.resolve().is_relative_to(root):
                problems[name] = f"left out {str(path)!r}: it resolves outside {str(root)!r}"
            else:
                files.append(str(path))
        if not files:
            continue
        try:
            con.execute(
                f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT *, "
                f"regexp_extract(filename, '/stages/[^/]+/([^/]+)/', 1) AS stage_key "
                f"FROM read_parquet({_sql_list(files)}, filename=true, union_by_name=true)"
            )
        except (duckdb.Error, OSError) as err:
            problems[name] = str(err).splitlines()[0]
        else:
            used.extend(files)
    return used, problems


def _sql_list(items: Sequence[str]) -> str:
    """A DuckDB list literal of strings."""
    return "[" + ", ".join("'" + item.replace("'", "''") + "'" for item in items) + "]"


def lock_down(con: duckdb.DuckDBPyConnection, files: Sequence[str]) -> None:
    """Leave `con` reaching only its database file and `files` (the views' Parquet files): no other file,
    directory or URL (`enable_external_access`), no extension loaded or installed on demand (so no
    download is ever tried), and no setting changed afterwards (`lock_configuration`). The order matters:
    `allowed_paths` can be set only while external access is still on, and the lock comes last."""
    if files:
        con.execute(f"SET allowed_paths = {_sql_list(files)}")
    for setting in ("autoinstall_known_extensions", "autoload_known_extensions", "allow_community_extensions",
                    "enable_external_access"):
        con.execute(f"SET {setting} = false")
    con.execute("SET lock_configuration = true")
