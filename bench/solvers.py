"""Solver benchmark: seconds per layer of Wanda, SparseGPT, ALPS and the classic per-column SparseGPT
loop (`bench.reference`), against the compute floor of one `W @ H` matmul of the same shapes timed
in the same run, and layer loss relative to SparseGPT on a correlated synthetic H (float32).

    python -m bench.solvers [--shapes 896x896,4096x4096] [--threads 2,1] [--repeats 3]

Writes bench/results/solvers.json and solvers.md (atomically). Timings are the minimum over
repeats; the floor is the minimum over all `W @ H` timings of that shape and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.reference import reference_sparsegpt
from rac.pruners import PruneConfig, prune
from rac.pruners.error import reconstruction_loss

SHAPES: tuple[tuple[int, int], ...] = ((896, 896), (4864, 896), (896, 4864), (4096, 4096), (11008, 4096))
THREADS: tuple[int, ...] = (2, 1)
REFERENCE_MAX_WORK = 4096 * 4096 * 4096  # rows * cols^2 up to which the slow reference loop runs
ALPS_MAX_COLS = 896  # ALPS: eigendecomposition + hundreds of matmuls; small layers only
ONE_THREAD_MAX_WORK = 4864 * 896 * 896  # the 1-thread table covers the small shapes only


@dataclass
class Record:
    rows: int
    cols: int
    threads: int
    method: str
    pattern: str
    seconds: float
    floor_seconds: float
    x_floor: float
    loss: float
    loss_vs_sparsegpt: float | None
    info: dict[str, Any]


def synthetic_layer(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, cols] and H = X^T X of 2*cols correlated tokens (low-rank mix + noise, log-normal scales)."""
    g = torch.Generator().manual_seed(seed)
    tokens, rank = 2 * cols, max(8, cols // 8)
    Z = torch.randn(tokens, rank, generator=g) @ (torch.randn(rank, cols, generator=g) / math.sqrt(rank))
    X = (Z + 0.3 * torch.randn(tokens, cols, generator=g)) * torch.exp(0.5 * torch.randn(cols, generator=g))
    return torch.randn(rows, cols, generator=g) / math.sqrt(cols), X.T @ X


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(minimum wall seconds over `repeats` calls, last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_shape(rows: int, cols: int, threads: int, repeats: int) -> list[Record]:
    """Time every applicable solver on one synthetic layer at `threads` torch threads."""
    torch.set_num_threads(threads)
    W, H = synthetic_layer(rows, cols)
    work = rows * cols * cols
    reps = repeats if work <= ONE_THREAD_MAX_WORK else max(1, repeats - 1)
    floors: list[float] = []

    def floor() -> None:
        floors.append(best_time(lambda: W @ H, reps)[0])

    runs: list[tuple[str, str, Callable[[], tuple[torch.Tensor, dict[str, Any]]]]] = []
    for pattern, spec in (("50%", {"sparsity": 0.5}), ("2:4", {"nm": (2, 4)})):
        for method in ("wanda", "sparsegpt", "alps"):
            if method == "alps" and cols > ALPS_MAX_COLS:
                continue
            cfg = PruneConfig(method=method, **spec)
            runs.append((method, pattern, _pruner_run(W, H, cfg)))
        if work <= REFERENCE_MAX_WORK and (pattern == "50%" or work <= ONE_THREAD_MAX_WORK):
            nm = spec.get("nm")
            runs.append(("reference-loop", pattern, _reference_run(W, H, 0.5, nm)))  # type: ignore[arg-type]
    records, sgpt_loss = [], {}
    for method, pattern, run in runs:
        floor()
        seconds, (W_hat, info) = best_time(run, 1 if method in ("alps", "reference-loop") else reps)
        loss = reconstruction_loss(W, W_hat, H)
        if method == "sparsegpt":
            sgpt_loss[pattern] = loss
        records.append(Record(rows, cols, threads, method, pattern, seconds, 0.0, 0.0, loss, None, info))
        print(f"  {rows}x{cols} t={threads} {method:>14} {pattern:>4}: {seconds:8.3f} s", flush=True)
    floor()
    for r in records:
        r.floor_seconds = min(floors)
        r.x_floor = r.seconds / r.floor_seconds
        r.loss_vs_sparsegpt = r.loss / sgpt_loss[r.pattern] if r.pattern in sgpt_loss else None
    return records


def _pruner_run(W: torch.Tensor, H: torch.Tensor, cfg: PruneConfig) -> Callable[[], tuple[torch.Tensor, dict[str, Any]]]:
    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        res = prune(W, H, cfg)
        return res.weight, {**res.info, "retries": len(res.retries)}

    return run


def _reference_run(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None
) -> Callable[[], tuple[torch.Tensor, dict[str, Any]]]:
    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        return reference_sparsegpt(W, H, sparsity, nm)[0], {}

    return run


def machine() -> dict[str, Any]:
    """CPU, cores, torch version/threads and the load average when the run started."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "default_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def to_markdown(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """Results table plus the run's machine notes."""
    lines = [
        "# Solver benchmark (float32, CPU)",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}; load average {meta['loadavg_at_start']} at start "
        "(the cores are shared with other jobs, so timings are noisy). "
        "`x floor` = seconds / seconds of one `W @ H` ([rows, cols] x [cols, cols]) timed in the same run "
        "at the same thread count. Loss = tr(ΔW H ΔW^T) on a correlated synthetic H (2*cols tokens), "
        "relative to SparseGPT with the same pattern. `reference-loop` is the classic per-column "
        "SparseGPT loop (`bench/reference.py`).",
        "",
        "| rows x cols | threads | method | pattern | seconds | floor s | x floor | loss / SparseGPT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        rel = "" if r.loss_vs_sparsegpt is None else f"{r.loss_vs_sparsegpt:.4f}"
        lines.append(
            f"| {r.rows}x{r.cols} | {r.threads} | {r.method} | {r.pattern} | {r.seconds:.3f} | "
            f"{r.floor_seconds:.3f} | {r.x_floor:.2f} | {rel} |"
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file next to `path`, then os.replace."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(
    results_dir: Path,
    shapes: Sequence[tuple[int, int]] = SHAPES,
    threads: Sequence[int] = THREADS,
    repeats: int = 3,
) -> None:
    """Run the benchmark and write solvers.json / solvers.md into `results_dir`."""
    meta = machine()
    records: list[Record] = []
    saved_threads = torch.get_num_threads()
    try:
        for t in threads:
            for rows, cols in shapes:
                if t == 1 and len(threads) > 1 and rows * cols * cols > ONE_THREAD_MAX_WORK:
                    continue
                records.extend(bench_shape(rows, cols, t, repeats))
    finally:
        torch.set_num_threads(saved_threads)
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": meta, "records": [asdict(r) for r in records]}
    write_atomic(results_dir / "solvers.json", json.dumps(payload, indent=1, default=str) + "\n")
    write_atomic(results_dir / "solvers.md", to_markdown(records, meta))


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    p.add_argument("--threads", default=",".join(map(str, THREADS)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args()


if __name__ == "__main__":
    args = _parse_args()
    shape_list = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    main(args.results, [(r, c) for r, c in shape_list], [int(t) for t in args.threads.split(",")], args.repeats)
