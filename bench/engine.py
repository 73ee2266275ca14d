"""Engine benchmark: peak memory of streamed compression of a >= 3 GiB model, and statistics-pass speed.

Memory: a random-init Llama-style model (TinyLlama-1.1B shapes with more layers, untied LM head, bf16) is
written tensor by tensor (never materialised whole), then pruned by `rac.engine.compress` in a child process
whose peak RSS (VmHWM, file-backed pages included) is compared with the size of the weights. Goal <= 0.3.
Speed: on two layers of the same model, seconds per token of the statistics pass (forward with Hessian hooks
on all four groups: the pass of `sequential="layer"`) against a plain forward of the same layer over the same
tokens, for float32 and bfloat16 compute. Goal <= 2x (float32), <= 2.5x (bfloat16: rac issue 14, item 5).
Everything generated is deleted afterwards. Run: `python -m bench.engine` (or `make bench`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import LlamaConfig

from rac.data.segments import CALIB_SCHEMA
from rac.engine import CompressConfig, compress
from rac.engine.actstore import ActStore
from rac.engine.batches import load_calibration
from rac.engine.layer import LayerKwargs, SegmentPlan, embed_pass, layer_forward, read_batch, stats_pass
from rac.engine.output import plan_shards, write_safetensors_stream
from rac.models.adapters import get_adapter
from rac.models.streaming import WeightFiles, build_skeleton, materialize, release
from rac.pruners import PruneConfig

GIB = 1024**3
SHAPE: dict[str, Any] = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                             tie_word_embeddings=False, rms_norm_eps=1e-5)
N_SEQ, SEQ_LEN = 16, 128  # 2048 calibration tokens


def write_random_model(dest: Path, n_layers: int, seed: int = 0, shape: dict[str, Any] | None = None) -> int:
    """A random bf16 Llama folder (`shape`, default SHAPE) written tensor by tensor; returns the weight bytes."""
    config = LlamaConfig(num_hidden_layers=n_layers, dtype="bfloat16", **(shape or SHAPE))
    config.save_pretrained(dest)
    specs = {k: ("BF16", list(v.shape)) for k, v in build_skeleton(config).state_dict().items()}

    def fetch(name: str) -> torch.Tensor:
        shape = specs[name][1]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards = plan_shards(specs, 2 * GIB)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_stream(dest / fname, [(n, *specs[n]) for n in names], fetch)
        weight_map.update({n: fname for n in names})
    total = sum(int(np.prod(s)) * 2 for _, s in specs.values())
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def write_calibration(path: Path, vocab: int, seed: int = 0, n_seq: int = N_SEQ, seq_len: int = SEQ_LEN) -> Path:
    """`n_seq` random sequences of `seq_len` tokens: a quarter prompt, the rest decode."""
    rng = np.random.default_rng(seed)
    rows = [{"seq_id": i, "source": "bench", "input_ids": rng.integers(0, vocab, seq_len).tolist(),
             "segment": [0] * (seq_len // 4) + [1] * (seq_len - seq_len // 4)} for i in range(n_seq)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CALIB_SCHEMA), str(path))
    return path


def _status() -> dict[str, int]:
    """Memory fields (kB) of /proc/self/status: VmRSS, VmHWM (peak RSS of this process image), RssAnon..."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith(("Vm", "Rss")):
            out[key] = int(rest.split()[0])
    return out


def _rss_sampler(stop: threading.Event, peaks: dict[str, int]) -> None:
    """Track peak RssAnon / RssFile (kB) every 50 ms."""
    while not stop.is_set():
        status = _status()
        for key in ("RssAnon", "RssFile"):
            peaks[key] = max(peaks.get(key, 0), status.get(key, 0))
        stop.wait(0.05)


def child(args: dict[str, Any]) -> dict[str, Any]:
    """Run one compress (in a fresh process) and report its peak memory.

    Peak RSS is VmHWM, not `ru_maxrss`: the latter survives exec and so includes the parent's RSS at fork.
    """
    baseline_kb = _status()["VmRSS"]
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_rss_sampler, args=(stop, peaks), daemon=True)
    sampler.start()
    cfg = CompressConfig.model_validate(args["cfg"])
    t0 = time.perf_counter()
    steps: list[Any] = []
    compress(Path(args["model"]), Path(args["calib"]), Path(args["out"]), cfg, Path(args["work"]),
             on_step=steps.append)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    prune_s = sum(lin.seconds for s in steps for lin in s.linears)
    return {"baseline_rss_mb": baseline_kb / 1024, "peak_rss_mb": _status()["VmHWM"] / 1024,
            "peak_rss_anon_mb": peaks.get("RssAnon", 0) / 1024, "peak_rss_file_mb": peaks.get("RssFile", 0) / 1024,
            "seconds": seconds, "prune_seconds": prune_s}


def memory_run(model: Path, calib: Path, tmp: Path, cfg: CompressConfig) -> dict[str, Any]:
    """`child` in a subprocess (so the parent's memory does not count)."""
    args = {"model": str(model), "calib": str(calib), "out": str(tmp / "out"), "work": str(tmp / "work"),
            "cfg": cfg.canonical()}
    proc = subprocess.run([sys.executable, "-m", "bench.engine", "--child", json.dumps(args)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"compress child failed:\n{proc.stderr[-4000:]}")
    shutil.rmtree(tmp / "out", ignore_errors=True)
    shutil.rmtree(tmp / "work", ignore_errors=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def speed_run(model: Path, calib_path: Path, tmp: Path, dtype: torch.dtype, layers: int = 2,
              repeats: int = 2, device: str = "cpu") -> dict[str, Any]:
    """Seconds per token: statistics pass (all groups' Hessians) vs plain forward, per layer, on `device`."""
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    files = WeightFiles(model)
    config = LlamaConfig.from_pretrained(model)
    adapter = get_adapter(config.model_type)
    skel = build_skeleton(config)
    calib = load_calibration(calib_path, config.vocab_size, config.max_position_embeddings, 4096)
    store = ActStore.create(tmp / "acts.bin", calib.n_tokens, config.hidden_size, "bfloat16")
    embed = skel.get_submodule(adapter.embed)
    materialize(embed, adapter.embed + ".", files, dtype, dev)
    if adapter.rotary is not None:
        skel.get_submodule(adapter.rotary).to(dev)
    embed_pass(skel, adapter, calib, store, dev)
    release(embed)
    store.commit()
    kwargs = LayerKwargs(skel, adapter, config.hidden_size, dtype, dev)
    plan = SegmentPlan.build({"prompt": 1.0, "decode": 1.0}, ["prompt", "decode"], dev)
    plain, stats = [], []
    for layer in range(layers):
        module = skel.model.layers[layer]
        materialize(module, adapter.layer_prefix(layer), files, dtype, dev)
        groups = dict(enumerate(adapter.groups))
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                for b in calib.batches:
                    layer_forward(module, read_batch(store, b, dtype, dev), kwargs(layer, len(b.rows), b.seq_len))
            sync()
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stats_pass(module, layer, groups, calib, store, kwargs, dtype, dev, plan)
            sync()
            stats.append(time.perf_counter() - t0)
        release(module)
    store.delete()
    n = calib.n_tokens
    best_plain, best_stats = min(plain), min(stats)
    return {"dtype": str(dtype).removeprefix("torch."), "tokens": n, "layers": layers, "device": device,
            "plain_us_per_token": 1e6 * best_plain / n, "stats_us_per_token": 1e6 * best_stats / n,
            "ratio": best_stats / best_plain}


def gemm_ratio(tokens: int = 2048, width: int = SHAPE["intermediate_size"], repeats: int = 3) -> dict[str, Any]:
    """Seconds of X^T X for X [tokens, width] in float32 (what the statistics pass runs) and in bfloat16 (what
    torch would run in a bf16 forward; its output is bf16, so the statistics cannot use it)."""
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, xs in (("float32", x), ("bfloat16", x.bfloat16())):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            xs.T @ xs
            times.append(time.perf_counter() - t0)
        out[name] = min(times)
    return {"tokens": tokens, "width": width, "float32_s": out["float32"], "bfloat16_s": out["bfloat16"],
            "ratio": out["float32"] / out["bfloat16"]}


def _layers_for(min_bytes: int) -> int:
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    per_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
    return -(-(min_bytes - 2 * 2 * v * h - 2 * h) // per_layer)


def _markdown(res: dict[str, Any]) -> str:
    m = res["memory"]
    lines = [
        "# Engine benchmark (CPU)", "",
        f"Machine: {res['machine']}; torch {res['torch']}, {res['threads']} threads; load average "
        f"{res['load_avg']:.1f} at start (cores shared with other jobs: timings are noisy).", "",
        "## Peak memory of streamed compression", "",
        f"Model: random Llama-style, {res['model']['layers']} layers, hidden {SHAPE['hidden_size']}, "
        f"intermediate {SHAPE['intermediate_size']}, bf16, {res['model']['gib']:.2f} GiB of safetensors; "
        f"calibration {N_SEQ} x {SEQ_LEN} tokens (prompt + decode segments).", "",
        "| pruner | order | seconds | prune s | baseline RSS MiB | peak RSS MiB | peak anon MiB | peak file MiB "
        "| peak / weights | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in m:
        lines.append(f"| {r['method']} | {r['sequential']} | {r['seconds']:.0f} | {r['prune_seconds']:.0f} "
                     f"| {r['baseline_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_anon_mb']:.0f} "
                     f"| {r['peak_rss_file_mb']:.0f} | {r['ratio']:.3f} | <= 0.3 |")
    lines += ["", "Peak RSS is VmHWM of the child process (file-backed pages of mapped shards and activation "
              "windows included); baseline = RSS after imports (torch, transformers, rac), before `compress`.", "",
              "## Statistics pass vs plain forward (same layer, same tokens)", "",
              "| compute dtype | tokens | layers | forward us/token | stats pass us/token | ratio | goal |",
              "|---|---|---|---|---|---|---|"]
    for s in res["speed"]:
        goal = "<= 2.5" if s["dtype"] == "bfloat16" else "<= 2"
        lines.append(f"| {s['dtype']} | {s['tokens']} | {s['layers']} | {s['plain_us_per_token']:.1f} "
                     f"| {s['stats_us_per_token']:.1f} | {s['ratio']:.2f} | {goal} |")
    lines += ["", res["note"], ""]
    if "gemm" in res:
        g = res["gemm"]
        lines += [f"Measured in the same run: X^T X for X [{g['tokens']}, {g['width']}] takes {g['float32_s']:.3f} s "
                  f"in float32 and {g['bfloat16_s']:.3f} s in bfloat16 ({g['ratio']:.1f}x).", ""]
    return "\n".join(lines)


NOTE = ("The statistics pass accumulates H = sum x x^T in float32 (`rac.pruners.stats`): per token that is "
        "sum over groups of d_in^2 multiply-adds, about as many as the layer's forward, but in float32. "
        "On this CPU torch has no bf16 x bf16 -> fp32 GEMM (`aten::mm.dtype` is CUDA-only), so against a "
        "bfloat16 (AMX) forward the float32 accumulation costs several forwards; against a float32 forward "
        "the ratio is the FLOP ratio.")


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(results_dir: Path = RESULTS_DIR) -> None:
    """Run both measurements and write engine.md / engine.json into `results_dir`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rac-bench-engine-"))
    try:
        n_layers = _layers_for(3 * GIB)
        t0 = time.perf_counter()
        size = write_random_model(tmp / "model", n_layers)
        gen_s = time.perf_counter() - t0
        calib = write_calibration(tmp / "calib.parquet", SHAPE["vocab_size"])
        res: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
            "model": {"layers": n_layers, "bytes": size, "gib": size / GIB, "write_seconds": gen_s},
            "memory": [], "speed": [], "note": NOTE,
        }
        for method in ("magnitude",):  # the full-H group-order path (SparseGPT's statistics), a cheap pruner
            cfg = CompressConfig(prune=PruneConfig(method=method, sparsity=0.5), sequential="group",
                                 statistics="full")
            r = memory_run(tmp / "model", calib, tmp, cfg)
            r.update(method=method, sequential=cfg.order, ratio=r["peak_rss_mb"] * 1024**2 / size,
                     anon_ratio=r["peak_rss_anon_mb"] * 1024**2 / size)
            res["memory"].append(r)
        for dtype in (torch.float32, torch.bfloat16):
            res["speed"].append(speed_run(tmp / "model", calib, tmp, dtype))
        res["gemm"] = gemm_ratio()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (results_dir / "engine.json").write_text(json.dumps(res, indent=2))
    (results_dir / "engine.md").write_text(_markdown(res))
    print(_markdown(res))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
