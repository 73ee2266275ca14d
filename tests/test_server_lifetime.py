"""The embedded Prefect server dies with the `rac` process that started it (issue 17: kill -9 leaves nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rac.store.index import Index

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "configs" / "tiny.yaml"


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append((int(entry.name), cmd))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_killing_rac_kills_its_embedded_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["RAC_PAUSE_AT"] = "run.opened=120"  # the flow is running (server up) and waits here
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "rac_prefect.flows.cli", "--work-dir", str(work), "run",
                             str(TINY), "--run-id", "k"], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        server: list[tuple[int, str]] = []
        while time.monotonic() < deadline and not server:
            row = Index(work).get_run("k") if (work / "rac.duckdb").exists() else None
            if row is not None and row["status"] == "running":  # opened by the flow: the server is up
                server = [c for c in _children(proc.pid) if "uvicorn" in c[1]]
            time.sleep(0.5)
        assert server, f"no embedded server child of rac pid {proc.pid}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid, _ in server):
            time.sleep(0.2)
        assert not [pid for pid, _ in server if _alive(pid)], f"server left behind: {server}"
    finally:
        if proc.poll() is None:
            proc.kill()
