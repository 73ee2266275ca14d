"""Process measurements shared by the two child scripts of `bench.peer` (standard library only: this module is
imported both in the project venv, by `bench.peer_rac`, and in llm-compressor's venv, by `bench.peer_child`).

A child is started fresh for every measurement with OMP/MKL threads fixed in its environment; it calls
`Meter.start()` after its imports (the import baseline), runs the measured region, then prints
`Meter.result(...)` as one JSON line, the last line of its stdout, which `bench.peer` parses.
Peak RSS is VmHWM of the child (its own peak, not `ru_maxrss`, which survives exec and so can include the
parent's RSS at fork); page faults and CPU times are `getrusage(RUSAGE_SELF)` deltas over the region.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "PEER-RESULT "


def proc_status() -> dict[str, int]:
    """The memory fields (kB) of /proc/self/status: VmRSS, VmHWM, RssAnon, RssFile, ..."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith(("Vm", "Rss")):
            out[key] = int(rest.split()[0])
    return out


def _usage() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "system_s": r.ru_stime, "minor_faults": float(r.ru_minflt),
            "major_faults": float(r.ru_majflt), "vol_ctx": float(r.ru_nvcsw), "invol_ctx": float(r.ru_nivcsw)}


class Meter:
    """Wall clock, CPU times, page faults and RSS of one measured region of a child process."""

    def __init__(self) -> None:
        self.t_process = time.perf_counter()
        self.t0 = 0.0
        self.usage0: dict[str, float] = {}
        self.baseline_kb = 0

    def start(self) -> None:
        """Mark the end of the imports: baseline RSS and the start of the measured region."""
        self.baseline_kb = proc_status()["VmRSS"]
        self.usage0 = _usage()
        self.t0 = time.perf_counter()

    def result(self, **fields: Any) -> dict[str, Any]:
        """The region's measurements merged with `fields`."""
        wall = time.perf_counter() - self.t0
        usage = _usage()
        status = proc_status()
        return {
            "wall_s": wall,
            "baseline_rss_mb": self.baseline_kb / 1024,
            "peak_rss_mb": status["VmHWM"] / 1024,
            "final_rss_mb": status["VmRSS"] / 1024,
            "usage": {k: usage[k] - self.usage0[k] for k in usage},
            "imports_s": self.t0 - self.t_process,
            "threads_env": os.environ.get("OMP_NUM_THREADS"),
            **fields,
        }


def emit(result: dict[str, Any]) -> None:
    """Print the result as the child's last stdout line."""
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


def parse(stdout: str) -> dict[str, Any]:
    """The result a child printed with `emit` (ValueError when there is none)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX):]))
    raise ValueError("child printed no result line")
