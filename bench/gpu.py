"""GPU check: streamed SparseGPT on a random 7B-shaped Llama on CUDA, seconds per layer, statistics pass vs
forward, peak GPU memory.

The model (Llama-2-7B shapes: hidden 4096, MLP 11008, 32 heads, vocab 32000; `--layers` decoder layers, 4 by
default, so the folder stays a few GB) is written tensor by tensor in bf16 with random weights, then pruned by
`rac.engine.compress` with `device: cuda` (50% SparseGPT, group-sequential, bf16 compute) on random calibration
tokens (a quarter prompt, the rest decode). Reported: seconds per decoder layer and per-linear solver seconds
(from the step records), the statistics pass against a plain forward of the same layer over the same tokens,
and `torch.cuda.max_memory_allocated` over the compression. Results go to bench/results/gpu.md and gpu.json.

Run on a machine with a GPU: `python -m bench.gpu` (about a minute of GPU time at the default sizes). The same
code runs on CPU at toy size (`python -m bench.gpu --toy --device cpu`), which the tests do, so the script
cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine import speed_run, write_calibration, write_random_model
from rac.engine import CompressConfig, StepRecord, compress
from rac.pruners import PruneConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHAPE_7B: dict[str, Any] = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                                tie_word_embeddings=False, rms_norm_eps=1e-5)
SHAPE_TOY: dict[str, Any] = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                                 tie_word_embeddings=False, rms_norm_eps=1e-5)


def _device_name(device: str) -> str:
    if device == "cuda":
        return str(torch.cuda.get_device_name(0))
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run(tmp: Path, device: str, toy: bool, layers: int, n_seq: int, seq_len: int) -> dict[str, Any]:
    """Write the model and calibration under `tmp`, compress on `device`, time the statistics pass."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: --device cuda but torch.cuda.is_available() is False (use --device cpu --toy)")
    shape = SHAPE_TOY if toy else SHAPE_7B
    t0 = time.perf_counter()
    size = write_random_model(tmp / "model", layers, shape=shape)
    calib = write_calibration(tmp / "calib.parquet", shape["vocab_size"], n_seq=n_seq, seq_len=seq_len)
    write_s = time.perf_counter() - t0
    cfg = CompressConfig(prune=PruneConfig(method="sparsegpt", sparsity=0.5), device=device,  # type: ignore[arg-type]
                         sequential="group", compute_dtype="bfloat16", act_dtype="bfloat16")
    steps: list[StepRecord] = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = compress(tmp / "model", calib, tmp / "out", cfg, tmp / "work", on_step=steps.append)
    seconds = time.perf_counter() - t0
    peak = int(torch.cuda.max_memory_allocated()) if device == "cuda" else None
    per_layer: dict[int, float] = {}
    for s in steps:
        per_layer[s.layer] = per_layer.get(s.layer, 0.0) + s.seconds
    solver = [lin.seconds for s in steps for lin in s.linears]
    zeros = sum(lin.sparsity * lin.shape[0] * lin.shape[1] for s in steps for lin in s.linears)
    total = sum(lin.shape[0] * lin.shape[1] for s in steps for lin in s.linears)
    speed = speed_run(tmp / "model", calib, tmp, torch.bfloat16, layers=min(2, layers), repeats=2, device=device)
    return {
        "device": device, "device_name": _device_name(device), "torch": torch.__version__, "toy": toy,
        "shape": shape, "layers": layers, "weight_bytes": size, "write_seconds": write_s,
        "calibration_tokens": result.n_tokens, "compress_seconds": seconds,
        "layer_seconds": [per_layer[k] for k in sorted(per_layer)], "solver_seconds_total": sum(solver),
        "solver_seconds_max": max(solver), "linears": len(solver), "achieved_sparsity": zeros / total,
        "peak_gpu_bytes": peak, "stats_vs_forward": speed, "load_avg": os.getloadavg()[0],
        "command": " ".join(["python", "-m", "bench.gpu", *sys.argv[1:]]),
    }


def markdown(res: dict[str, Any]) -> str:
    """bench/results/gpu.md from the JSON record."""
    s = res["stats_vs_forward"]
    peak = "n/a (CPU)" if res["peak_gpu_bytes"] is None else f"{res['peak_gpu_bytes'] / 1024**3:.2f} GiB"
    shape = res["shape"]
    per_layer = ", ".join(f"{x:.2f}" for x in res["layer_seconds"])
    return "\n".join([
        "# GPU check: streamed SparseGPT on CUDA" + (" (toy size, CPU)" if res["toy"] else ""), "",
        f"Device: {res['device_name']}; torch {res['torch']}; command `{res['command']}`.", "",
        f"Model: random Llama, {res['layers']} layers, hidden {shape['hidden_size']}, MLP {shape['intermediate_size']},"
        f" bf16, {res['weight_bytes'] / 1024**3:.2f} GiB; {res['calibration_tokens']} calibration tokens; "
        "50% SparseGPT, group-sequential, bf16 compute.", "",
        "| compress s | s per layer | solver s (total / max per linear) | sparsity | peak GPU memory |",
        "|---|---|---|---|---|",
        f"| {res['compress_seconds']:.1f} | {per_layer} | {res['solver_seconds_total']:.2f} / "
        f"{res['solver_seconds_max']:.3f} | {res['achieved_sparsity']:.4f} | {peak} |", "",
        "| statistics pass us/token | forward us/token | ratio |", "|---|---|---|",
        f"| {s['stats_us_per_token']:.2f} | {s['plain_us_per_token']:.2f} | {s['ratio']:.2f} |", "",
    ])


def main(argv: list[str] | None = None, results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--toy", action="store_true", help="tiny shapes (for CPU and the tests)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=results_dir, help="folder for gpu.md / gpu.json")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.sequences < 1 or args.seq_len < 8:
        ap.error(f"--layers, --sequences must be >= 1 and --seq-len >= 8, got {args.layers}, {args.sequences}, "
                 f"{args.seq_len}")
    tmp = Path(tempfile.mkdtemp(prefix="rac-bench-gpu-"))
    try:
        res = run(tmp, args.device, args.toy, args.layers, args.sequences, args.seq_len)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu" if not args.toy else "gpu-toy"
    (args.out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
