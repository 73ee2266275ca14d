"""Schedules fire (issue 13): against a real `prefect server start`, a served deployment's *scheduled* runs complete.

Both tests share one Prefect server started here on 127.0.0.1 (its own PREFECT_HOME, a free port) and
stopped, with every process started here, in a `finally`:

- a trivial flow served with `Flow.serve(interval=5 s)` (the mechanism `rac serve` uses): a run the scheduler
  made (auto_scheduled, idempotency key "scheduled ...") reaches Completed;
- `rac serve data/configs/tiny.yaml --cron "* * * * *"` (the real `rac_prune.serve` path, in a subprocess):
  the deployment is registered with its cron schedule and parameters, the scheduler creates its runs, and one
  of them reaches Completed with a finished rac run in the work dir. Cron fires on minute boundaries, so this
  one waits up to a minute for its first run.

With SQLAlchemy 2.1 the server's scheduler fails on every loop (`InvalidRequestError: Can't evaluate bulk DML
statement`: Prefect's bulk insert of scheduled flow runs passes the `FlowRun.state` hybrid, which SQLAlchemy
2.1 refuses in bulk DML) and no run is ever scheduled; the failure message then names the cause.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "configs" / "tiny.yaml"
HOST = "127.0.0.1"
SERVER_START_S = 90
TICK_S = 5  # the trivial flow's interval

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 15) -> None:
    """SIGTERM the process group (the process and what it started: uvicorn, flow-run processes), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, even after the leader exited
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


@dataclass
class Server:
    url: str
    env: dict[str, str]
    log: Path
    procs: list[subprocess.Popen[bytes]]

    def spawn(self, args: list[str], log: Path, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        """A client process of this server in its own process group (stopped with the fixture)."""
        out = log.open("wb")
        proc = subprocess.Popen(args, cwd=str(cwd), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def diagnosis(self, *logs: Path) -> str:
        text = self.log.read_text(errors="replace")
        why = ""
        if "Can't evaluate bulk DML statement" in text:
            import sqlalchemy

            why = (f"the Prefect scheduler fails with SQLAlchemy {sqlalchemy.__version__} "
                   "(InvalidRequestError: Can't evaluate bulk DML statement); Prefect 3.7 needs sqlalchemy<2.1\n")
        tails = [f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in (self.log, *logs)
                 if p.exists()]
        return why + "\n".join(tails)

    def client(self) -> Any:
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://{HOST}:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # served deployments look for due runs every 2 s (default 10)
        "PREFECT_LOGGING_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    srv = Server(url, env, root / "server.log", [])
    try:
        srv.spawn([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
                  srv.log)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if srv.procs[0].poll() is not None:
                pytest.fail(f"prefect server exited with {srv.procs[0].returncode}\n{srv.diagnosis()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {SERVER_START_S} s\n{srv.diagnosis()}")
            time.sleep(0.5)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}):  # this process's client talks to that server only
            yield srv
    finally:
        for proc in reversed(srv.procs):  # clients first, the server last
            _stop(proc)


def _wait_for_completed_scheduled_run(srv: Server, deployment_id: Any, timeout_s: float,
                                      serve: subprocess.Popen[bytes], *logs: Path) -> Any:
    """The first flow run of the deployment that the scheduler created and that reached Completed."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout_s
    runs: list[Any] = []
    with srv.client() as client:
        while time.monotonic() < deadline:
            if serve.poll() is not None:
                pytest.fail(f"the serve process exited with {serve.returncode}\n{srv.diagnosis(*logs)}")
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            for run in runs:
                assert run.state_type is None or run.state_type.value not in ("FAILED", "CRASHED"), (
                    f"scheduled run {run.name} ended {run.state_type}\n{srv.diagnosis(*logs)}")
            done = [r for r in runs if r.auto_scheduled and str(r.idempotency_key).startswith("scheduled ")
                    and r.state_type is not None and r.state_type.value == "COMPLETED"]
            if done:
                return done[0]
            time.sleep(1)
    states = [(r.name, r.auto_scheduled, r.state_type) for r in runs]
    pytest.fail(f"no scheduled run Completed within {timeout_s} s; runs: {states}\n{srv.diagnosis(*logs)}")


TICK_FLOW = f"""
from datetime import timedelta
from prefect import flow

@flow(name="tick")
def tick() -> int:
    return 1

if __name__ == "__main__":
    tick.serve(name="tick-every-{TICK_S}s", interval=timedelta(seconds={TICK_S}))
"""


def test_served_interval_schedule_runs_to_completed(server: Server, tmp_path: Path) -> None:
    script = tmp_path / "tick.py"
    script.write_text(TICK_FLOW)
    log = tmp_path / "tick-serve.log"
    serve = server.spawn([sys.executable, str(script)], log, cwd=tmp_path)
    try:
        dep = _wait_for_deployment(server, f"tick/tick-every-{TICK_S}s", serve, log)
        assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [TICK_S]
        assert all(s.active for s in dep.schedules)
        run = _wait_for_completed_scheduled_run(server, dep.id, 45, serve, log)
        assert run.deployment_id == dep.id
    finally:
        _stop(serve)


def _wait_for_deployment(srv: Server, name: str, serve: subprocess.Popen[bytes], log: Path,
                         timeout_s: float = 60) -> Any:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with srv.client() as client:
        while time.monotonic() < deadline:
            if serve.poll() is not None:
                pytest.fail(f"the serve process exited with {serve.returncode}\n{srv.diagnosis(log)}")
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(0.5)
    pytest.fail(f"deployment {name} not registered within {timeout_s} s\n{srv.diagnosis(log)}")


def test_rac_serve_cron_schedule_runs_to_completed(server: Server, tmp_path: Path) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from rac.store.index import Index

    work = tmp_path / "work"
    log = tmp_path / "rac-serve.log"
    serve = server.spawn([sys.executable, "-m", "rac_prefect.flows.cli", "--work-dir", str(work), "serve",
                          str(TINY), "--cron", "* * * * *", "--name", "rac-every-minute"], log)
    try:
        dep = _wait_for_deployment(server, "rac-prune/rac-every-minute", serve, log, timeout_s=90)
        assert [(s.schedule.cron, s.active) for s in dep.schedules] == [("* * * * *", True)]
        assert dep.parameters == {"config_path": str(TINY.resolve()), "work_dir": str(work.resolve())}
        deadline = time.monotonic() + 30
        with server.client() as client:  # the scheduler fills the deployment's next runs ahead
            while True:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                if any(r.auto_scheduled for r in runs):
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"the scheduler made no runs for {dep.name}\n{server.diagnosis(log)}")
                time.sleep(1)
        run = _wait_for_completed_scheduled_run(server, dep.id, 60 + 60, serve, log)
        assert run.expected_start_time is not None and run.expected_start_time.second == 0  # a minute boundary
        rows = [r for r in Index(work).list_runs() if r["status"] == "done"] if (work / "rac.duckdb").exists() else []
        assert rows, f"no finished rac run in {work}\n{server.diagnosis(log)}"
    finally:
        _stop(serve)
