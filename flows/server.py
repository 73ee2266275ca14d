"""Prefect's embedded (ephemeral) API server, started so that it dies with the `rac` process.

Without `PREFECT_API_URL`, Prefect starts a temporary uvicorn server in a child process on first use and
stops it at exit; a `rac` killed with SIGKILL never runs that exit hook, and the orphaned server keeps its
database open for minutes. `start_embedded_server` starts the same server (Prefect's own
`SubprocessASGIServer`, which every Prefect client in this process then reuses) from the main thread with
the child asking the kernel for SIGKILL when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent goes away."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@contextmanager
def _children_die_with_parent() -> Iterator[None]:
    """Processes started meanwhile get `_die_with_parent` (only the server starts one here)."""
    real = subprocess.Popen

    class Popen(real):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("preexec_fn", _die_with_parent)
            super().__init__(*args, **kwargs)

    subprocess.Popen = Popen  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = real  # type: ignore[misc]


def start_embedded_server() -> int | None:
    """Start the embedded server now, bound to this process; its pid (None when a server URL is set, on a
    platform without prctl, or off the main thread, where the child would die with the thread)."""
    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    with _children_die_with_parent():
        server.start()
    return server.server_process.pid if server.server_process is not None else None
