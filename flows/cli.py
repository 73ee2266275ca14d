"""`rac` console script: run, resume, status, sql, report, compare, verify, serve.

Exit codes: 0 done; 1 the run failed in a stage (or `rac verify` found changed artifacts); 2 bad input (config, model, run id, fingerprint
mismatch, a write statement given to `rac sql`), nothing written; 3 the run is held by another process.
The work dir (index + stage outputs + runs) is `--work-dir`, else $RAC_WORK_DIR, else ./work.
The CLI belongs to the Prefect layer (it starts flows). Prefect, the run config (which pulls in the
library: torch, transformers) and the run session are imported only by the commands that need them, so
`rac status`, `rac sql` and `rac --help` start in well under a second.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

from rac.reporting.report import fmt
from rac.runs.workdir import FileLock, RunLockedError, WorkDir, crashpoint, new_run_id
from rac.store.index import Index, IndexBusyError, ReadOnlyQueryError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_LOCKED = 0, 1, 2, 3
BAD_INPUT = (FileNotFoundError, ValueError)  # RunConfigError, FingerprintMismatchError, ... are ValueErrors
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
console = Console(highlight=False, soft_wrap=True)
if not console.is_terminal:  # piped/logged output: do not squeeze tables into 80 columns
    console = Console(highlight=False, soft_wrap=True, width=160)


def _work_dir(args: argparse.Namespace) -> Path:
    return Path(args.work_dir or os.environ.get("RAC_WORK_DIR") or "work").resolve()


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_run(args: argparse.Namespace, resume: bool = False) -> int:
    """Validate (nothing written on bad input), then run the rac_prune flow for a new or existing run."""
    from rac.runs.preflight import preflight
    from rac.runs.run_config import load_run_config, parse_run_config
    from rac.runs.session import precheck, register, stored_run

    work = _work_dir(args)
    if resume:
        stored, config_path = stored_run(work, args.run)
        cfg = parse_run_config(stored, source=f"run {args.run}")
        run_id = args.run
    else:
        cfg = load_run_config(args.config)
        config_path = str(Path(args.config).resolve())
        run_id = args.run_id or new_run_id(cfg.name)
    preflight(cfg, work)  # the model folder, tokenizer, prompt sources, work dir and disk: nothing written
    prepared = precheck(work, run_id, cfg.name, cfg.model, cfg.canonical(), config_path, resume_only=resume)
    verb = "resuming" if prepared.existing else "starting"
    err_console.print(f"[bold]{verb} run {run_id}[/] (model {prepared.run.model_dir}, work dir {work})")
    register(prepared)  # the run row exists before Prefect starts: a crash from here on is resumable
    crashpoint("cli.registered")
    _prefect_env()
    from rac_prefect.flows.prune import rac_prune  # Prefect only from here on
    from rac_prefect.flows.server import start_embedded_server

    start_embedded_server()  # killed with this process, never left behind

    if not args.debug:
        _quiet_tracebacks()
    try:
        result = rac_prune(config=cfg, run_id=run_id, work_dir=str(work), config_path=config_path)
    except RunLockedError:
        raise
    except Exception as err:  # a stage failed: the run row says so; the partial work is kept for resume
        err_console.print(f"[red]run {run_id} failed:[/] {_one_line(err)}")
        err_console.print(f"continue with: rac --work-dir {work} resume {run_id}")
        return EXIT_FAILED
    _print_evals(Index(work), run_id)
    console.print(f"report: {result.get('report', '-')}")
    console.print(f"index:  {Index(work).path}   (try: rac sql \"select * from evals\")")
    return EXIT_OK


class _NoTraceback(logging.Filter):
    """Drops the traceback of a log record (the message stays): `rac run` without --debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _quiet_tracebacks() -> None:
    """Prefect logs a failed task's traceback; the CLI says what failed in one line instead."""
    for handler in {*logging.getLogger("prefect").handlers, *logging.getLogger().handlers}:
        handler.addFilter(_NoTraceback())


def _one_line(err: BaseException) -> str:
    """What failed, on one line: a full disk names the path; other errors their type and first line."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"no space left on the device holding {err.filename or 'the work dir'!s}; free space, then resume"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"


def _print_evals(index: Index, run_id: str) -> None:
    rows = index.evals(run_id)
    if not rows:
        return
    table = Table(title=f"run {run_id}: evaluation")
    for col in ("label", "accuracy", "95% CI", "mean tok", "p90 tok", "runaway", "eval s"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for r in rows:
        table.add_row(
            r["label"], fmt(r["accuracy"]), f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
            fmt(r["mean_tokens"], 1), fmt(r["p90_tokens"], 0), fmt(r["runaway_share"]), fmt(r["wall_s"], 1),
        )
    console.print(table)


def cmd_status(args: argparse.Namespace) -> int:
    index = Index(_work_dir(args))
    if not index.path.exists():
        raise FileNotFoundError(f"no index at {index.path}: no run has been started in this work dir")
    if args.run is None:
        table = Table(title=f"runs in {index.work_dir}")
        for col in ("run", "name", "status", "created", "updated", "message"):
            table.add_column(col)
        for r in index.list_runs():
            table.add_row(r["run_id"], r["name"], _live_status(index, r["run_id"], r["status"]),
                          str(r["created"])[:19], str(r["updated"])[:19], r["message"] or "")
        console.print(table)
        return EXIT_OK
    run = index.get_run(args.run)
    if run is None:
        raise ValueError(f"no run {args.run!r} in {index.path}; known: {[r['run_id'] for r in index.list_runs()]}")
    console.print(f"run {args.run}: [bold]{_live_status(index, args.run, run['status'])}[/] {run['message'] or ''}")
    table = Table(title="stages")
    for col in ("stage", "stage_key", "status", "reused", "seconds", "layers done"):
        table.add_column(col)
    for s in index.run_stages(args.run):
        steps = len(index.steps(s["stage_key"])) if s["stage"] == "prune" else None
        table.add_row(s["name"], s["stage_key"], s["status"], str(bool(s["reused"])), fmt(s["seconds"], 1),
                      "" if steps is None else str(steps))
    console.print(table)
    _print_evals(index, args.run)
    return EXIT_OK


def _live_status(index: Index, run_id: str, status: str) -> str:
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


def cmd_sql(args: argparse.Namespace) -> int:
    cols, rows = Index(_work_dir(args)).query(args.query)
    table = Table(*cols)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    console.print(table)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from rac.reporting.report import write_report

    paths = write_report(_work_dir(args), args.run)
    for p in paths:
        console.print(str(p))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the rac_prune flow as a deployment that runs the config on a cron schedule (blocks)."""
    from rac.runs.preflight import preflight
    from rac.runs.run_config import load_run_config

    preflight(load_run_config(args.config), _work_dir(args))  # bad configs and data refused before serving
    _prefect_env()
    from rac_prefect.flows.prune import rac_prune

    rac_prune.serve(
        name=args.name, cron=args.cron,
        parameters={"config_path": str(Path(args.config).resolve()), "work_dir": str(_work_dir(args))},
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash every recorded output of the work dir (or of one run); exit 1 when anything changed."""
    from rac.runs.verify import verify_work_dir

    report = verify_work_dir(_work_dir(args), args.run)
    for m in report.mismatches:
        console.print(f"[red]changed[/] {m.step} ({m.run_id}, stage {m.stage_key}): {m.problem}")
    summary = f"{report.n_artifacts} artifact(s) of {report.n_stages} completed stage(s) checked"
    if report.ok:
        console.print(f"{summary}: all match their recorded sha256")
        return EXIT_OK
    console.print(f"{summary}: {len(report.mismatches)} changed; their stages are recomputed by the next run")
    return EXIT_FAILED


def cmd_compare(args: argparse.Namespace) -> int:
    from rac.reporting.compare import write_comparison

    work = _work_dir(args)
    out = Path(args.out) if args.out else work / "compare"
    for p in write_comparison(work, out, treat=args.treat, bases=tuple(args.base or ("prompt", "generic"))):
        console.print(str(p))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rac", description="Reasoning-Aware Compression pipeline")
    p.add_argument("--work-dir", help="work dir with rac.duckdb, stages/ and runs/ (default $RAC_WORK_DIR or ./work)")
    p.add_argument("--debug", action="store_true", help="show the tracebacks of failed stages")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a YAML config (a new run, or continue --run-id)")
    r.add_argument("config")
    r.add_argument("--run-id", help="run id; an existing id resumes that run (same model and config only)")
    rs = sub.add_parser("resume", help="continue an interrupted run with its stored config")
    rs.add_argument("run")
    st = sub.add_parser("status", help="list runs, or one run's stages and results")
    st.add_argument("run", nargs="?")
    q = sub.add_parser("sql", help="read-only SQL over the index and the Parquet views")
    q.add_argument("query")
    rp = sub.add_parser("report", help="write a run's Markdown + PNG report")
    rp.add_argument("run")
    cp = sub.add_parser("compare", help="compare calibrations over every evaluated model of the work dir")
    cp.add_argument("--out", help="output folder (default <work dir>/compare)")
    cp.add_argument("--treat", default="rac", help="calibration whose accuracy is compared (default rac)")
    cp.add_argument("--base", action="append", help="calibration(s) compared against (default prompt, generic)")
    vf = sub.add_parser("verify", help="re-hash every recorded artifact (of one run) and list what changed")
    vf.add_argument("run", nargs="?")
    sv = sub.add_parser("serve", help="serve the flow on a cron schedule (Prefect deployment)")
    sv.add_argument("config")
    sv.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: daily 03:00)")
    sv.add_argument("--name", default="rac-scheduled")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "resume":
            return cmd_run(args, resume=True)
        handlers = {"status": cmd_status, "sql": cmd_sql, "report": cmd_report, "serve": cmd_serve,
                    "compare": cmd_compare, "verify": cmd_verify}
        return handlers[args.command](args)
    except RunLockedError as err:
        err_console.print(f"[red]error:[/] {err}")
        return EXIT_LOCKED
    except (ReadOnlyQueryError, duckdb.Error) as err:
        err_console.print(f"[red]error:[/] {err}")
        return EXIT_BAD_INPUT
    except IndexBusyError as err:
        err_console.print(f"[red]error:[/] {err}")
        return EXIT_LOCKED
    except BAD_INPUT as err:
        err_console.print(f"[red]error:[/] {err}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]; continue with: rac resume RUN")
        return 130


if __name__ == "__main__":
    sys.exit(main())
