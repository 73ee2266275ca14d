"""Test helpers for work dirs: a relocated copy (`copy_work_dir`) and a content snapshot (`snapshot`).

The index stores absolute paths (file:// URIs of every artifact in `artifacts.uri`, `stages.inputs/outputs`,
the model and work dirs in `runs.config/fingerprint`, ...), `runs/<id>/run.json` repeats the run row, and
`runs/<id>/prefect/` holds pickled Prefect results that name absolute paths too. A copy is made usable by
rewriting every path under `src` to the same path under `dst` (index and run.json) and dropping the Prefect
records (Prefect then runs the task bodies again, and they find the verified stages through the index).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from rac.store.index import INDEX_NAME

try:
    from duckdb.sqltypes import VARCHAR
except ImportError:  # duckdb < 1.4
    from duckdb.typing import VARCHAR  # type: ignore[no-redef]

# what may follow a path for the path to end there (anything else continues a file name: `/w/ref` is not a
# prefix of `/w/ref2`)
_NAME_CHAR = r"[\w.~%+@-]"
STRING_TYPES = ("VARCHAR", "JSON")


def path_rewriter(src: Path, dst: Path) -> Callable[[str], str]:
    """str -> str that maps `src` (as a plain path or a file:// URI) and everything under it to `dst`."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    forms = {src.as_uri(): dst.as_uri(), str(src): str(dst)}  # URI first: the longer match wins at a position
    pattern = re.compile("(?:" + "|".join(re.escape(f) for f in forms) + f")(?!{_NAME_CHAR})")
    return lambda text: pattern.sub(lambda m: forms[m.group(0)], text)


def _rewrite_json(value: Any, rewrite: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return rewrite(value)
    if isinstance(value, list):
        return [_rewrite_json(v, rewrite) for v in value]
    if isinstance(value, dict):
        return {rewrite(k): _rewrite_json(v, rewrite) for k, v in value.items()}
    return value


def string_columns(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str]]:
    """(table, column, type) of every VARCHAR / JSON column of the index's base tables."""
    rows = con.execute(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c "
        "JOIN information_schema.tables t ON t.table_catalog = c.table_catalog "
        "AND t.table_schema = c.table_schema AND t.table_name = c.table_name "
        "WHERE c.table_schema = 'main' AND t.table_type = 'BASE TABLE' ORDER BY c.table_name, c.ordinal_position"
    ).fetchall()
    return [(str(t), str(c), str(ty).upper()) for t, c, ty in rows if str(ty).upper() in STRING_TYPES]


def copy_work_dir(src: Path | str, dst: Path | str) -> Path:
    """Copy work dir `src` to `dst` (which must not exist) so that the copy stands on its own.

    - files: copied as they are (stage outputs keep their bytes, so their sha256 still verify), except the
      Prefect result records under runs/*/prefect/, which are left out;
    - index: in one transaction, every VARCHAR/JSON column of every table (read from information_schema)
      has each `src` path and file:// URI replaced by the `dst` one (JSON values are parsed, their strings
      rewritten, and written back);
    - runs/*/run.json: the same rewrite.
    Returns the resolved `dst`.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"cannot copy work dir {src} into itself ({dst})")
    if not (src / INDEX_NAME).is_file():
        raise FileNotFoundError(f"no index in {src}")

    def skip_prefect(folder: str, names: list[str]) -> list[str]:
        return ["prefect"] if Path(folder).parent == src / "runs" and "prefect" in names else []

    shutil.copytree(src, dst, ignore=skip_prefect, symlinks=True)
    rewrite = path_rewriter(src, dst)
    con = duckdb.connect(str(dst / INDEX_NAME))
    try:
        con.create_function("rac_rewrite_path", rewrite, [VARCHAR], VARCHAR,
                            null_handling="default", side_effects=False)
        con.create_function("rac_rewrite_json", lambda s: json.dumps(_rewrite_json(json.loads(s), rewrite)),
                            [VARCHAR], VARCHAR, null_handling="default",
                            side_effects=False)
        con.execute("BEGIN TRANSACTION")
        try:
            for table, column, kind in string_columns(con):
                fn = "rac_rewrite_json" if kind == "JSON" else "rac_rewrite_path"
                col = '"' + column.replace('"', '""') + '"'
                con.execute(f'UPDATE "{table}" SET {col} = {fn}({col}::VARCHAR) WHERE {col} IS NOT NULL')
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    for run_json in sorted((dst / "runs").glob("*/run.json")):
        data = _rewrite_json(json.loads(run_json.read_text()), rewrite)
        run_json.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return dst


def index_rows(work: Path | str) -> dict[str, list[dict[str, Any]]]:
    """Every row (column -> value) of every base table of the index, tables by name."""
    con = duckdb.connect(str(Path(work) / INDEX_NAME), read_only=True)
    try:
        tables = [str(t) for (t,) in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
            "AND table_type = 'BASE TABLE' ORDER BY table_name").fetchall()]
        out: dict[str, list[dict[str, Any]]] = {}
        for table in tables:
            cur = con.execute(f'SELECT * FROM "{table}"')
            cols = [d[0] for d in cur.description or []]
            out[table] = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
        return out
    finally:
        con.close()


def index_strings(work: Path | str) -> list[tuple[str, str, str]]:
    """(table, column, value cast to VARCHAR) of every non-null cell of every base table of the index."""
    return [(table, c, str(v)) for table, rows in index_rows(work).items() for row in rows
            for c, v in row.items() if v is not None]


def snapshot(work: Path | str) -> dict[str, Any]:
    """What a work dir holds: sha256 of every file (the index file excepted) and every row of every index
    table (so a reader that opens the index read-write but changes nothing keeps the same snapshot)."""
    root = Path(work)
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(INDEX_NAME)}
    rows = {t: sorted(repr(sorted(r.items())) for r in rs) for t, rs in index_rows(root).items()}
    return {"files": files, "index": rows}


def calibration_stages(root: Path, run_id: str, names: tuple[str, ...] = ("rac",)) -> dict[str, Any]:
    """tiny.yaml's prompts -> CoTs -> the calibration sets `names`, through the stage steps (no Prefect), in a
    fresh run `run_id` of work dir `root`: {"env", "cfg", "prompts", "cots", "calib": {name: StageOutput}}."""
    from rac.models.assets import tiny_model
    from rac.models.streaming import model_revision
    from rac.runs import stages as steps
    from rac.runs.run_config import load_run_config
    from rac.runs.workdir import RunRef
    from rac.store.index import Index

    cfg = load_run_config(Path(__file__).resolve().parent.parent / "data" / "configs" / "tiny.yaml")
    model = tiny_model("llama")
    env = RunRef(str(root), run_id, str(model), model_revision(model))
    Index(root).create_run(run_id, "t", {}, {}, "", 1)
    assert cfg.generate is not None
    prompts = steps.prompts_step(env, cfg.prompts, log=lambda m: None)
    cots = steps.cots_step(env, cfg.generate, prompts, log=lambda m: None)
    calib = {n: steps.calib_step(env, n, cfg.calibrations[n], prompts, cots if n == "rac" else None,
                                 log=lambda m: None) for n in names}
    return {"env": env, "cfg": cfg, "prompts": prompts, "cots": cots, "calib": calib, "model": model}
