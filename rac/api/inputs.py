"""What `rac.api` takes from a notebook, turned into what the stages take: prompts, models, configs, work dirs.

In-memory prompts (a list of strings, a list of dicts with `prompt`/`question`, `answer` and `id` keys, or a
`datasets.Dataset` with those columns) are written once to `<work_dir>/inputs/prompts-<sha256>.jsonl`, named
by their content, and read by the prompt stage as a `source: file` prompt set. The same prompts therefore
give the same file, the same stage config and the same cache key in every call, like a YAML config naming
that file would. Every bad input is an `ApiError` (a ValueError) of one line naming the value.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from pydantic import ValidationError

from rac.config import StageConfig
from rac.data.prompts import PromptsConfig
from rac.data.templates import TemplateConfig
from rac.models.streaming import model_revision
from rac.runs.session import resolve_model_dir
from rac.store.artifacts import atomic_write_text

if TYPE_CHECKING:
    from datasets import Dataset

C = TypeVar("C", bound=StageConfig)
Scalar: TypeAlias = str | int | float | bool
# a value of a config mapping (`solver=` / `engine=`): what a YAML section holds
ConfigValue: TypeAlias = Scalar | None | Sequence[Scalar] | Mapping[str, float]
Prompts: TypeAlias = "PromptsConfig | Sequence[str] | Sequence[Mapping[str, Scalar]] | Dataset"
API_SOURCE = "rac.api"  # the `source` of the config an API run is bound to (`rac resume` refuses such runs)
TEXT_KEYS = ("prompt", "question")
INPUTS_DIR = "inputs"


class ApiError(ValueError):
    """A bad argument to `rac.api`; the message is one line naming the value."""


def work_dir_of(work_dir: Path | str | None) -> Path:
    """`work_dir`, else $RAC_WORK_DIR, else ./work (the CLI's rule), resolved."""
    return Path(work_dir or os.environ.get("RAC_WORK_DIR") or "work").resolve()


def config_of(cls: type[C], where: str, **values: object) -> C:
    """cls(**values) with the None values left out (the library defaults stay); ApiError on the first problem."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        if first["type"] == "extra_forbidden":
            raise ApiError(f"{where}: unknown key {loc!r}; known: {', '.join(sorted(cls.model_fields))}") from None
        msg = str(first["msg"]).replace("Value error, ", "").splitlines()[0]
        value = f"{loc} = {first.get('input')!r}: " if loc else ""  # a check across fields names no one field
        raise ApiError(f"{where}: {value}{msg}{more}") from None
    except (TypeError, ValueError) as err:
        raise ApiError(f"{where}: {str(err).splitlines()[0]}") from None


def model_of(model: Path | str, where: str) -> tuple[Path, str]:
    """(folder, content revision) of a shipped alias, a local Hugging Face folder or a hub id."""
    if not isinstance(model, str | os.PathLike) or not str(model).strip():
        raise ApiError(f"{where}: model = {model!r}: give an alias, a model folder or a hub id owner/name")
    try:
        folder = resolve_model_dir(str(model))
    except (FileNotFoundError, ValueError) as err:
        raise ApiError(f"{where}: {str(err).splitlines()[0]}") from None
    return folder, model_revision(folder)


def _row(item: object, i: int, where: str) -> dict[str, str]:
    if isinstance(item, str):
        row: Mapping[str, object] = {"prompt": item}
    elif isinstance(item, Mapping):
        row = item
    else:
        raise ApiError(f"{where}: prompts[{i}] is a {type(item).__name__}; give a string or a dict with a "
                       f"'prompt' key")
    key = next((k for k in TEXT_KEYS if k in row), None)
    if key is None:
        raise ApiError(f"{where}: prompts[{i}] has no 'prompt' or 'question' key; keys: {sorted(map(str, row))}")
    text = row[key]
    if not isinstance(text, str) or not text.strip():
        raise ApiError(f"{where}: prompts[{i}][{key!r}] = {text!r}: expected non-empty text")
    answer = row.get("answer", "")
    ident = row.get("id", f"p{i:05d}")
    return {"id": str(ident), "question": text, "answer": "" if answer is None else str(answer)}


def prompt_rows(prompts: Prompts, where: str, need_answers: bool) -> list[dict[str, str]]:
    """Rows {id, question, answer} of in-memory prompts, checked (ids unique; answers when `need_answers`)."""
    items: Sequence[object]
    if hasattr(prompts, "column_names") and hasattr(prompts, "to_list"):  # a datasets.Dataset
        items = prompts.to_list()
    elif isinstance(prompts, Sequence) and not isinstance(prompts, str | bytes):
        items = prompts
    else:
        raise ApiError(f"{where}: prompts of type {type(prompts).__name__}: give a list of strings, a list of "
                       f"dicts with 'prompt'/'answer', a datasets.Dataset or a PromptsConfig")
    if not items:
        raise ApiError(f"{where}: prompts is empty")
    rows = [_row(item, i, where) for i, item in enumerate(items)]
    seen: set[str] = set()
    for i, r in enumerate(rows):
        if r["id"] in seen:
            raise ApiError(f"{where}: prompts[{i}] repeats id {r['id']!r}; ids must be unique")
        seen.add(r["id"])
        if need_answers and not r["answer"].strip():
            raise ApiError(f"{where}: prompts[{i}] (id {r['id']!r}) has no 'answer': evaluation grades against it")
    return rows


def prompts_config(prompts: Prompts, work: Path, template: TemplateConfig | None, where: str,
                   need_answers: bool) -> PromptsConfig:
    """The PromptsConfig of `prompts`: a given PromptsConfig as it is (its template replaced by `template`
    when one is given), else the content-named JSONL file under `<work>/inputs/` (written once)."""
    if isinstance(prompts, PromptsConfig):
        return prompts if template is None else prompts.model_copy(update={"template": template})
    rows = prompt_rows(prompts, where, need_answers)
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    path = work / INPUTS_DIR / f"prompts-{hashlib.sha256(text.encode()).hexdigest()[:20]}.jsonl"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    return config_of(PromptsConfig, where, source="file", path=str(path), fmt="jsonl", question_col="question",
                     answer_col="answer", id_col="id", template=template or TemplateConfig())
