"""Progress of long tasks: a rich progress bar on the console and a Prefect progress artifact."""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rac.runs.workdir import RunRef


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from free text."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "rac"


def generation_key(env: RunRef, name: str) -> str:
    """The progress artifact key of a cots stage: `<run>-generation` (the dense CoTs), else with its name."""
    return f"{env.run_id}-generation" + ("" if name == "cots" else f"-{name}")


def log(message: str) -> None:
    """Log through the Prefect run logger when inside a run, else print."""
    from prefect import get_run_logger

    try:
        get_run_logger().info(message)
    except MissingContextError:
        print(message)


class TaskProgress:
    """Callable `(done, total, what)` that advances a rich bar and a Prefect progress artifact."""

    def __init__(self, title: str, key: str) -> None:
        self.title = title
        self.key = artifact_key(key)
        self._bar: Progress | None = None
        self._task: Any = None
        self._artifact: UUID | None = None

    def __enter__(self) -> TaskProgress:
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[what]}"), TimeElapsedColumn())
        self._bar.start()
        self._task = self._bar.add_task(self.title, total=None, what="")
        try:
            self._artifact = cast(UUID, create_progress_artifact(progress=0.0, key=self.key, description=self.title))
        except MissingContextError:
            self._artifact = None
        return self

    def __call__(self, done: int, total: int, what: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total or None, what=what)
        if self._artifact is not None and total:
            update_progress_artifact(self._artifact, progress=min(100.0, 100.0 * done / total))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._artifact is not None and exc is None:
            update_progress_artifact(self._artifact, progress=100.0)
