"""The `rac` commands that read a work dir and start no flow: status, sql, report, compare, verify, export,
eval (`--harness lm-eval`, a thin layer over `rac.api.plan_harness` / `run_plan`).

They import no Prefect and no torch: `rac status` and `rac sql` answer in well under a second. Output goes
through rich consoles made on first use (a piped or logged stdout gets 160 columns, not 80).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rac.runs.workdir import FileLock, WorkDir

if TYPE_CHECKING:
    from rich.console import Console

    from rac.store.index import Index

EXIT_OK, EXIT_FAILED = 0, 1
HARNESS_COLUMNS = ("label", "task", "metric", "filter", "value", "stderr", "n")
SQL_CELL_WIDTH = 60  # a wider value (a JSON column) is cut in the table view; csv and json keep it whole


@cache
def out() -> Console:
    from rich.console import Console

    con = Console(highlight=False, soft_wrap=True)
    return con if con.is_terminal else Console(highlight=False, soft_wrap=True, width=160)


@cache
def err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def work_dir(args: argparse.Namespace) -> Path:
    """`--work-dir`, else $RAC_WORK_DIR, else ./work."""
    return Path(getattr(args, "work_dir", None) or os.environ.get("RAC_WORK_DIR") or "work").resolve()


def _fmt(x: Any, digits: int = 3) -> str:
    from rac.reporting.numbers import fmt

    return fmt(x, digits)


def print_evals(index: Index, run_id: str) -> None:
    """The evaluation table of a run (nothing when it evaluated nothing)."""
    from rich.table import Table

    rows = index.evals(run_id)
    if not rows:
        return
    table = Table(title=f"run {run_id}: evaluation")
    for col in ("label", "accuracy", "95% CI", "mean tok", "p90 tok", "runaway", "eval s"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for r in rows:
        table.add_row(
            r["label"], _fmt(r["accuracy"]), f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
            _fmt(r["mean_tokens"], 1), _fmt(r["p90_tokens"], 0), _fmt(r["runaway_share"]), _fmt(r["wall_s"], 1),
        )
    out().print(table)


def cmd_status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from rac.store.index import Index

    index = Index(work_dir(args))
    if not index.path.exists():
        raise FileNotFoundError(f"no index at {index.path}: no run has been started in this work dir")
    if args.run is None:
        table = Table(title=f"runs in {index.work_dir}")
        for col in ("run", "name", "status", "created", "updated", "message"):
            table.add_column(col)
        for r in index.list_runs():
            table.add_row(r["run_id"], r["name"], live_status(index, r["run_id"], r["status"]),
                          str(r["created"])[:19], str(r["updated"])[:19], r["message"] or "")
        out().print(table)
        return EXIT_OK
    run = index.get_run(args.run)
    if run is None:
        raise ValueError(f"no run {args.run!r} in {index.path}; known: {[r['run_id'] for r in index.list_runs()]}")
    out().print(f"run {args.run}: [bold]{live_status(index, args.run, run['status'])}[/] {run['message'] or ''}")
    table = Table(title="stages")
    for col in ("stage", "stage_key", "status", "reused", "seconds", "layers done"):
        table.add_column(col)
    for s in index.run_stages(args.run):
        steps = len(index.steps(s["stage_key"])) if s["stage"] in ("prune", "prune-step") else None
        table.add_row(s["name"], s["stage_key"], s["status"], str(bool(s["reused"])), _fmt(s["seconds"], 1),
                      "" if steps is None else str(steps))
    out().print(table)
    print_evals(index, args.run)
    print_harness(index, args.run)
    return EXIT_OK


def print_harness(index: Index, run_id: str) -> None:
    """The standard-benchmark numbers of a run (nothing when it has none)."""
    from rich.table import Table

    rows = index.harness_results(run_id)
    if not rows:
        return
    table = Table(title=f"run {run_id}: {rows[0]['harness']} {rows[0]['harness_version']}")
    for col in HARNESS_COLUMNS:
        table.add_column(col, justify="right" if col in ("value", "stderr", "n") else "left")
    for r in rows:
        table.add_row(r["label"], r["task"], r["metric"], r["filter"], _fmt(r["value"], 4), _fmt(r["stderr"], 4),
                      "" if r["n"] is None else str(r["n"]))
    out().print(table)


def cmd_eval(args: argparse.Namespace) -> int:
    """Standard benchmarks on a run's models: everything is checked first (exit 2, nothing written), then
    each model is evaluated (a failure: exit 1, the models done so far stay in the index)."""
    from rac.api import plan_harness, run_plan
    from rac.store.index import Index

    work = work_dir(args)
    plan = plan_harness(args.run, args.tasks, limit=args.limit, backend=args.backend, include_path=args.include_path,
                        num_fewshot=args.num_fewshot, batch_size=args.batch_size, dtype=args.dtype,
                        device=args.device, models=args.models.split(",") if args.models else None, work_dir=work)
    err().print(f"[bold]{args.harness}[/] {','.join(plan.cfg.tasks)} on {', '.join(m.label for m in plan.models)} "
                f"of run {args.run}")
    try:
        run_plan(plan, log=lambda m: err().print(m, markup=False))
    except Exception as exc:  # a model failed to evaluate: the stage row says so
        first = (str(exc).strip().splitlines() or [""])[0]
        err().print(f"[red]evaluation failed:[/] {type(exc).__name__}: {first}")
        return EXIT_FAILED
    print_harness(Index(work), args.run)
    out().print(f"rac sql \"select * from harness_results where run_id = '{args.run}'\"")
    return EXIT_OK


def live_status(index: Index, run_id: str, status: str) -> str:
    """A 'running' row whose run lock is free, or a 'starting' one whose process is gone, belongs to a
    process that died: say so."""
    if status == "starting":
        row = index.get_run(run_id) or {}
        return f"starting (pid {row.get('pid')})" if _alive(row.get("pid")) else "interrupted (rac resume)"
    if status != "running":
        return status
    lock = FileLock(WorkDir(index.work_dir).lock_file(run_id), f"run {run_id!r}")
    return f"running ({lock.holder()})" if lock.is_held() else "interrupted (rac resume)"


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cell(value: Any, width: int | None) -> str:
    text = "NULL" if value is None else str(value)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def cmd_sql(args: argparse.Namespace) -> int:
    """Read-only SQL; `--format table` (wide cells cut), `csv` or `json` (whole values)."""
    from rac.store.index import Index

    cols, rows = Index(work_dir(args)).query(args.query)
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(cols)
        writer.writerows([("" if v is None else v) for v in row] for row in rows)
    elif args.format == "json":
        sys.stdout.write(json.dumps([dict(zip(cols, row, strict=True)) for row in rows], default=str) + "\n")
    else:
        from rich.table import Table

        table = Table(*cols)
        for row in rows:
            table.add_row(*(_cell(v, SQL_CELL_WIDTH) for v in row))
        out().print(table)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from rac.reporting.report import write_report

    for p in write_report(work_dir(args), args.run):
        out().print(str(p))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from rac.reporting.compare import write_comparison

    work = work_dir(args)
    dest = Path(args.out) if args.out else work / "compare"
    pairs = []
    for raw in args.pair or ():
        a, sep, b = raw.partition(":")
        if not (sep and a and b):
            raise ValueError(f"--pair {raw!r}: expected two model labels as A:B")
        pairs.append((a, b))
    for p in write_comparison(work, dest, treat=args.treat, bases=tuple(args.base or ("prompt", "generic")),
                              pairs=tuple(pairs)):
        out().print(str(p))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every recorded output of the work dir (or of one run); exit 1 when anything changed."""
    from rac.runs.verify import verify_work_dir

    report = verify_work_dir(work_dir(args), args.run)
    for m in report.mismatches:
        out().print(f"[red]changed[/] {m.step} ({m.run_id}, stage {m.stage_key}): {m.problem}")
    summary = f"{report.n_artifacts} artifact(s) of {report.n_stages} completed stage(s) checked"
    if report.ok:
        out().print(f"{summary}: all match their recorded sha256")
        return EXIT_OK
    out().print(f"{summary}: {len(report.mismatches)} changed; their stages are recomputed by the next run")
    return EXIT_FAILED


def print_pruned_models(work: Path, run_id: str) -> None:
    """Where a run's pruned models are, and how to export one (the end of `rac run`)."""
    from rac.reporting.export import export_command, pruned_models

    models = pruned_models(work, run_id, verify=False)
    for m in models:
        out().print(f"pruned model {m.label}: {m.folder}")
    if models:
        out().print(f"export one with its model card: {export_command(work, run_id, models[0].label)}")


def cmd_export(args: argparse.Namespace) -> int:
    """A pruned model as a self-contained HF folder with a model card."""
    from rac.reporting.export import export_model

    out().print(str(export_model(work_dir(args), args.run, args.label, Path(args.dest))))
    return EXIT_OK


def cmd_export_calibration(args: argparse.Namespace) -> int:
    """A run's calibration set as a `datasets` dataset (llm-compressor's `oneshot` takes it; docs/export.md)."""
    from rac.runs.calibration_export import export_run_calibration

    exported = export_run_calibration(work_dir(args), args.run, args.name, Path(args.dest))
    out().print(f"{exported.path}: {exported.n_seqs} sequences, {exported.n_tokens} tokens "
                f"(load it with datasets.load_from_disk)")
    return EXIT_OK
