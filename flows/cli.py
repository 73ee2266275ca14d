"""`rac` console script: run, resume, serve (they start flows), and status, sql, report, compare, verify,
export, export-calibration, eval (`--harness lm-eval`: standard benchmarks through `rac.api.harness`).

Exit codes: 0 done; 1 the run failed in a stage (or `rac verify` found changed artifacts); 2 bad input
(config, data, model folder, run id, fingerprint mismatch, a refused `rac sql` statement), nothing
written; 3 the run (or the index) is held by another process.
The work dir (index + stage outputs + runs) is `--work-dir`, else $RAC_WORK_DIR, else ./work; the global
options may come before or after the command (`rac run cfg.yaml --work-dir W`).
The CLI belongs to the Prefect layer (it starts flows). This module imports only the standard library at
start: Prefect, the run config (the library: torch, transformers), DuckDB and rich are imported by the
commands that need them, so `rac --help` runs even before the dependencies are installed and `rac status`
and `rac sql` answer in well under a second (flows/cli_workdir.py holds those commands).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rac.runs.workdir import RunLockedError, crashpoint, new_run_id
from rac_prefect.flows import cli_workdir as wd

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_LOCKED = 0, 1, 2, 3
BAD_INPUT = (FileNotFoundError, ValueError)  # RunConfigError, PreflightError, ... are ValueErrors


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_run(args: argparse.Namespace, resume: bool = False) -> int:
    """Validate (nothing written on bad input), then run the rac_prune flow for a new or existing run."""
    from rac.runs.preflight import preflight
    from rac.runs.run_config import load_run_config, parse_run_config
    from rac.runs.session import precheck, register, stored_run
    from rac.store.index import Index

    work = wd.work_dir(args)
    if resume:
        stored, config_path = stored_run(work, args.run)
        from rac.api.inputs import API_SOURCE

        if stored.get("source") == API_SOURCE:
            raise ValueError(f"run {args.run!r} was made by rac.api and has no run config to resume: call the same "
                             "rac.api functions again (its completed stages are reused)")
        cfg = parse_run_config(stored, source=f"run {args.run}")
        run_id = args.run
    else:
        cfg = load_run_config(args.config)
        config_path = str(Path(args.config).resolve())
        run_id = args.run_id or new_run_id(cfg.name)
    preflight(cfg, work)  # the model folder, tokenizer, prompt sources, work dir and disk: nothing written
    prepared = precheck(work, run_id, cfg.name, cfg.model, cfg.canonical(), config_path, resume_only=resume)
    verb = "resuming" if prepared.existing else "starting"
    wd.err().print(f"[bold]{verb} run {run_id}[/] (model {prepared.run.model_dir}, work dir {work})")
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
        wd.err().print(f"[red]run {run_id} failed:[/] {_one_line(err)}")
        wd.err().print(f"continue with: rac --work-dir {work} resume {run_id}")
        return EXIT_FAILED
    wd.print_evals(Index(work), run_id)
    wd.print_pruned_models(work, run_id)
    wd.out().print(f"report: {result.get('report', '-')}")
    wd.out().print(f"index:  {Index(work).path}   (try: rac sql \"select * from evals\")")
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


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the rac_prune flow as a deployment that runs the config on a schedule (blocks; docs/scheduling.md).

    Scheduling needs a Prefect server (PREFECT_API_URL): the embedded one cannot schedule, so serving
    against it would register a schedule that never fires. Refused before anything is served."""
    from datetime import timedelta

    from rac.runs.preflight import preflight
    from rac.runs.run_config import load_run_config

    preflight(load_run_config(args.config), wd.work_dir(args))  # bad configs and data refused before serving
    _prefect_env()
    from prefect.settings import PREFECT_API_URL

    from rac_prefect.flows.prune import rac_prune

    if not PREFECT_API_URL.value():
        raise ValueError("rac serve needs a Prefect server to schedule runs (the embedded one cannot): start one "
                         "with `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    schedule = ({"interval": timedelta(seconds=args.interval)} if args.interval is not None
                else {"cron": args.cron or "0 3 * * *"})
    rac_prune.serve(
        name=args.name, **schedule,
        parameters={"config_path": str(Path(args.config).resolve()), "work_dir": str(wd.work_dir(args))},
    )
    return EXIT_OK


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """--work-dir and --debug, on the main parser (defaults) and on every command (SUPPRESS: unset there
    keeps what was given before the command)."""
    parser.add_argument("--work-dir", default=default,
                        help="work dir with rac.duckdb, stages/ and runs/ (default $RAC_WORK_DIR or ./work)")
    parser.add_argument("--debug", action="store_true", default=default if default is not None else False,
                        help="show the tracebacks of failed stages")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rac", description="Reasoning-Aware Compression pipeline")
    _global_options(p, None)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        _global_options(c, argparse.SUPPRESS)
        return c

    r = command("run", "run a YAML config (a new run, or continue --run-id)")
    r.add_argument("config")
    r.add_argument("--run-id", help="run id; an existing id resumes that run (same model and config only)")
    command("resume", "continue an interrupted run with its stored config").add_argument("run")
    command("status", "list runs, or one run's stages and results").add_argument("run", nargs="?")
    q = command("sql", "read-only SQL over the index and the Parquet views (docs/schema.md)")
    q.add_argument("query")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help=f"table (cells over {wd.SQL_CELL_WIDTH} characters cut), csv or json (whole values)")
    command("report", "write a run's Markdown + PNG report").add_argument("run")
    cp = command("compare", "compare calibrations over every evaluated model of the work dir")
    cp.add_argument("--out", help="output folder (default <work dir>/compare)")
    cp.add_argument("--treat", default="rac", help="calibration whose accuracy is compared (default rac)")
    cp.add_argument("--base", action="append", help="calibration(s) compared against (default prompt, generic)")
    cp.add_argument("--pair", action="append", metavar="A:B",
                    help="also model A - model B (labels, e.g. rac-sparsegpt-50pct-owl:rac-sparsegpt-50pct), paired "
                         "over their shared problems and CoTs; repeatable")
    command("verify", "re-hash every recorded artifact (of one run) and list what changed").add_argument(
        "run", nargs="?")
    ex = command("export", "write a pruned model as a self-contained HF folder with a model card")
    ex.add_argument("run")
    ex.add_argument("label", help="the pruned model, e.g. rac-sparsegpt-50pct (rac status RUN lists them)")
    ex.add_argument("dest")
    ec = command("export-calibration", "write a run's calibration set as a datasets dataset (docs/export.md)")
    ec.add_argument("run")
    ec.add_argument("name", help="the calibration set, e.g. rac or prompt")
    ec.add_argument("dest")
    ev = command("eval", "standard benchmarks (lm-eval) on a run's dense and pruned models, into the index")
    ev.add_argument("run")
    ev.add_argument("--harness", required=True, choices=("lm-eval",), help="the benchmark harness")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    ev.add_argument("--limit", type=int, help="samples per task (default: all)")
    ev.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="lm-eval model backend (default hf)")
    ev.add_argument("--include-path", help="a folder of lm-eval task YAML files (local tasks)")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    ev.add_argument("--batch-size", type=int, help="batch size (default 8)")
    ev.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="model dtype (default auto)")
    ev.add_argument("--device", choices=("cpu", "cuda"), help="hf backend device (default cpu)")
    ev.add_argument("--models", help="comma-separated labels to evaluate (default: dense and every pruned model)")
    sv = command("serve", "serve the flow on a schedule (a Prefect deployment; needs PREFECT_API_URL)")
    sv.add_argument("config")
    when = sv.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron schedule (default: daily 03:00)")
    when.add_argument("--interval", type=float, help="seconds between runs, instead of --cron")
    sv.add_argument("--name", default="rac-scheduled")
    return p


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "resume": lambda a: cmd_run(a, resume=True), "serve": cmd_serve,
    "status": wd.cmd_status, "sql": wd.cmd_sql, "report": wd.cmd_report, "compare": wd.cmd_compare,
    "verify": wd.cmd_verify, "export": wd.cmd_export, "export-calibration": wd.cmd_export_calibration,
    "eval": wd.cmd_eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import duckdb

    from rac.store.index import IndexBusyError, ReadOnlyQueryError

    try:
        return HANDLERS[args.command](args)
    except (RunLockedError, IndexBusyError) as err:
        wd.err().print(f"[red]error:[/] {err}")
        return EXIT_LOCKED
    except (ReadOnlyQueryError, duckdb.Error) as err:
        wd.err().print(f"[red]error:[/] {err}")
        return EXIT_BAD_INPUT
    except BAD_INPUT as err:
        wd.err().print(f"[red]error:[/] {err}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        wd.err().print("[yellow]interrupted[/]; continue with: rac resume RUN")
        return 130


if __name__ == "__main__":
    sys.exit(main())
