"""Solver benchmark: seconds per layer of Wanda, SparseGPT, ALPS, the classic per-column SparseGPT
loop (`bench.reference`), GPTQ and round-to-nearest, against the compute floor of one `W @ H` matmul of
the same shapes timed in the same run, and layer loss on a correlated synthetic H (float32): pruning
relative to SparseGPT with the same pattern, quantization relative to RTN on the same grid.

    python -m bench.solvers [--shapes 896x896,4096x4096] [--threads 2,1] [--repeats 3]

Every row names its mask scope (PruneConfig.scope: "matrix" = the count per block over all rows,
SparseGPT's default; "row" = per output row; N:M is per row); the reference loop runs with the scope of the
SparseGPT row it is compared with. GPTQ rows: w4 g128, w4 g128 with act order "weight" (static groups),
w8 per channel. Writes bench/results/solvers.json and solvers.md (atomically). Timings are the minimum
over repeats; the floor is the minimum over all `W @ H` timings of that shape and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.reference import reference_sparsegpt
from rac.pruners import PruneConfig, QuantSpec, prune, rtn
from rac.pruners.error import reconstruction_loss

SHAPES: tuple[tuple[int, int], ...] = ((896, 896), (4864, 896), (896, 4864), (4096, 4096), (11008, 4096))
THREADS: tuple[int, ...] = (2, 1)
REFERENCE_MAX_WORK = 4096 * 4096 * 4096  # rows * cols^2 up to which the slow reference loop runs
ALPS_MAX_COLS = 896  # ALPS: eigendecomposition + hundreds of matmuls; small layers only
ONE_THREAD_MAX_WORK = 4864 * 896 * 896  # the 1-thread table covers the small shapes only
PRUNE_PATTERNS: tuple[tuple[str, dict[str, Any]], ...] = (("50%", {"sparsity": 0.5}), ("2:4", {"nm": (2, 4)}))
QUANT_PATTERNS: tuple[QuantSpec, ...] = (QuantSpec(bits=4, group_size=128),
                                         QuantSpec(bits=4, group_size=128, act_order="weight"),
                                         QuantSpec(bits=8, group_size=None))
Run = Callable[[], tuple[torch.Tensor, dict[str, Any]]]


@dataclass
class Record:
    rows: int
    cols: int
    threads: int
    method: str
    pattern: str
    scope: str  # the mask's count rule ("matrix", "row"), "-" for quantization
    seconds: float
    floor_seconds: float
    x_floor: float
    loss: float
    loss_vs_sparsegpt: float | None
    loss_vs_rtn: float | None
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
    records, base = [], {}
    baseline: dict[str, str] = {}
    for method, pattern, scope, base_pattern, run in solver_runs(W, H):
        baseline[pattern] = base_pattern
        floors.append(best_time(lambda: W @ H, reps)[0])
        seconds, (W_hat, info) = best_time(run, 1 if method in ("alps", "reference-loop") else reps)
        loss = reconstruction_loss(W, W_hat, H)
        if method in ("sparsegpt", "rtn"):
            base[pattern] = loss
        records.append(Record(rows, cols, threads, method, pattern, scope, seconds, 0.0, 0.0, loss, None, None, info))
        print(f"  {rows}x{cols} t={threads} {method:>14} {pattern:>7} {scope:>6}: {seconds:8.3f} s", flush=True)
    floors.append(best_time(lambda: W @ H, reps)[0])
    for r in records:
        r.floor_seconds = min(floors)
        r.x_floor = r.seconds / r.floor_seconds
        if baseline[r.pattern] in base:
            ratio = r.loss / base[baseline[r.pattern]]
            r.loss_vs_rtn, r.loss_vs_sparsegpt = (ratio, None) if r.scope == "-" else (None, ratio)
    return records


def solver_runs(W: torch.Tensor, H: torch.Tensor) -> list[tuple[str, str, str, str, Run]]:
    """(method, pattern, scope, baseline pattern, run) of every solver that applies to this layer: the loss of
    a pruning row is compared with SparseGPT's on its pattern, a GPTQ row's with RTN's on the same grid (RTN
    has no act order: w4g128a is compared with RTN w4g128)."""
    rows, cols = W.shape
    work = rows * cols * cols
    runs: list[tuple[str, str, str, str, Run]] = []
    for pattern, spec in PRUNE_PATTERNS:
        for method in ("wanda", "sparsegpt", "alps"):
            if method == "alps" and cols > ALPS_MAX_COLS:
                continue
            cfg = PruneConfig(method=method, **spec)
            runs.append((method, pattern, cfg.scope, pattern, _pruner_run(W, H, cfg)))
        if work <= REFERENCE_MAX_WORK and (pattern == "50%" or work <= ONE_THREAD_MAX_WORK):
            cfg = PruneConfig(method="sparsegpt", **spec)  # the same mask rule as the SparseGPT row
            runs.append(("reference-loop", pattern, cfg.scope, pattern, _reference_run(W, H, cfg)))
    for quant in QUANT_PATTERNS:
        grid = quant.model_copy(update={"act_order": False}).label
        if quant.act_order is False:
            runs.append(("rtn", grid, "-", grid, _rtn_run(W, quant)))
        runs.append(("gptq", quant.label, "-", grid, _pruner_run(W, H, PruneConfig(method="gptq", quant=quant))))
    return runs


def _pruner_run(W: torch.Tensor, H: torch.Tensor, cfg: PruneConfig) -> Run:
    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        res = prune(W, H, cfg)
        return res.weight, {**res.info, "retries": len(res.retries)}

    return run


def _reference_run(W: torch.Tensor, H: torch.Tensor, cfg: PruneConfig) -> Run:
    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        return reference_sparsegpt(W, H, cfg.target_sparsity, cfg.nm, cfg.blocksize, cfg.damp, cfg.scope)[0], {}

    return run


def _rtn_run(W: torch.Tensor, spec: QuantSpec) -> Run:
    def run() -> tuple[torch.Tensor, dict[str, Any]]:
        return rtn(W, spec).dequantize(), {"quant": spec.label}

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
        "loadavg_at_start": list(os.getloadavg()),
        "command": " ".join(["python -m bench.solvers", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def to_markdown(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """Results table plus the run's machine notes."""
    start, end = (", ".join(f"{v:.2f}" for v in meta[k]) for k in ("loadavg_at_start", "loadavg_at_end"))
    lines = [
        "# Solver benchmark (float32, CPU)",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['seconds']:.0f} s). Machine: {meta['cpu']}, "
        f"{meta['cores']} cores, torch {meta['torch']}, OMP_WAIT_POLICY={meta['omp_wait_policy']}; load average "
        f"(1, 5, 15 min) {start} at start and {end} at the end: the cores are shared with other jobs, so timings "
        "are noisy (each is the best of its repeats). `x floor` = seconds / seconds of one `W @ H` ([rows, cols] x "
        "[cols, cols]) timed in the same run at the same thread count. Loss = tr(ΔW H ΔW^T) on a correlated "
        "synthetic H (2*cols tokens): pruning relative to SparseGPT with the same pattern, quantization relative "
        "to round-to-nearest (`rtn`) on the same grid (RTN has no act order). `scope` is the mask's count rule: `matrix` = the pruned "
        "count per block of 128 columns over all rows (SparseGPT's default), `row` = per output row (Wanda, ALPS, "
        "every N:M). `reference-loop` is the classic per-column SparseGPT loop (`bench/reference.py`) with the "
        "scope of the SparseGPT row it is compared with. Quantization patterns: `w4g128` (4-bit, groups of 128), "
        "`w4g128a` (the same with act order \"weight\": columns in decreasing diag H, static groups), `w8ch` "
        "(8-bit per channel).",
        "",
        "| rows x cols | threads | method | pattern | scope | seconds | floor s | x floor | loss / SparseGPT | loss / RTN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        rel = "" if r.loss_vs_sparsegpt is None else f"{r.loss_vs_sparsegpt:.4f}"
        rel_rtn = "" if r.loss_vs_rtn is None else f"{r.loss_vs_rtn:.4f}"
        lines.append(
            f"| {r.rows}x{r.cols} | {r.threads} | {r.method} | {r.pattern} | {r.scope} | {r.seconds:.3f} | "
            f"{r.floor_seconds:.3f} | {r.x_floor:.2f} | {rel} | {rel_rtn} |"
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
    start = time.perf_counter()
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
    meta["loadavg_at_end"] = list(os.getloadavg())
    meta["seconds"] = time.perf_counter() - start
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
