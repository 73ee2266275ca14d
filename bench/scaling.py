"""Scaling model: memory and time of RAC compression for 7B / 32B / 70B reasoning models, plus the two
constants measured here that the model needs (fp32 GEMM rate, gloo all-reduce bandwidth of a Hessian).

The model is arithmetic over each model's published shapes (docs/SCALING.md explains every line):
weights per decoder layer (bf16), activation stores at 1M calibration tokens (bf16, two boundaries,
split over data-parallel ranks), Hessian sizes (float32, per group and slot), all-reduce bytes per layer,
statistics / forward / SparseGPT FLOPs, generation at a given decode throughput.
Run: `python -m bench.scaling` (writes bench/results/scaling.{json,md}).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GB = 1e9
TOKENS = 1_000_000


@dataclass(frozen=True)
class Shape:
    """Decoder shapes of a model (q/o width = heads x head_dim = hidden for these models)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key/value heads x head_dim
    vocab: int

    def linears(self) -> dict[str, tuple[int, int]]:
        """[out, in] of every pruned linear of one layer."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (f, h), "up": (f, h), "down": (h, f)}

    def group_inputs(self) -> list[int]:
        """d_in of the four groups [q,k,v] -> [o] -> [gate,up] -> [down]: one Hessian each."""
        return [self.hidden, self.hidden, self.hidden, self.intermediate]

    def layer_params(self) -> int:
        return sum(o * i for o, i in self.linears().values())

    def params(self) -> int:
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden


MODELS = (  # DeepSeek-R1-Distill shapes: Qwen2.5-Math-7B, Qwen2.5-32B, Llama-3.3-70B
    Shape("7B (R1-Distill-Qwen-7B)", 3584, 18944, 28, 512, 152064),
    Shape("32B (R1-Distill-Qwen-32B)", 5120, 27648, 64, 1024, 152064),
    Shape("70B (R1-Distill-Llama-70B)", 8192, 28672, 80, 1024, 128256),
)


def sparsegpt_flops(out: int, d_in: int) -> float:
    """Cholesky + inverse of H (~d^3) plus the blocked OBS updates (~2 out d^2) of one linear."""
    return float(d_in) ** 3 + 2.0 * out * d_in**2


def model_row(m: Shape, ranks: int = 1, slots: int = 1) -> dict[str, Any]:
    """Sizes and FLOPs of one model at 1M calibration tokens; `slots` Hessians per group (1: merged)."""
    h_bytes = [4 * d * d * slots for d in m.group_inputs()]
    stats_macs = sum(d * d for d in m.group_inputs())  # per token per layer: one x^T x per group
    return {
        "model": m.name, "params_B": m.params() / 1e9, "layers": m.layers,
        "layer_weights_GB": 2 * m.layer_params() / GB,
        "act_store_GB": 2 * TOKENS * m.hidden * 2 / GB / ranks,  # bf16, input + output boundary, per rank
        "H_qkv_GB": h_bytes[0] / GB, "H_down_GB": h_bytes[3] / GB,
        "H_peak_GB": (max(h_bytes) + 4 * m.intermediate**2 + 4 * m.hidden * m.intermediate) / GB,
        "allreduce_per_layer_GB": sum(h_bytes) / GB,
        "stats_PFLOP": 2 * stats_macs * m.layers * TOKENS / 1e15,
        "forward_PFLOP": 2 * m.layer_params() * m.layers * TOKENS / 1e15,
        "prune_PFLOP": m.layers * sum(sparsegpt_flops(o, i) for o, i in m.linears().values()) / 1e15,
        "weights_GB": 2 * m.params() / GB,
    }


H200 = {"hbm_GB": 141.0, "bw_TBps": 4.8, "bf16_TFLOPs": 790.0}  # bf16 rate as measured on the lent H200s


def generation_row(m: Shape, gpus: int, cot_tokens: int = 8192, gpu: dict[str, float] = H200) -> dict[str, Any]:
    """Roofline of vLLM decoding on `gpus` tensor-parallel GPUs: KV cache per token, sequences of
    `cot_tokens` that fit beside the weights, and the decode rate bound min(memory, compute)."""
    weights = 2.0 * m.params()
    kv_per_token = 2 * m.layers * m.kv_dim * 2  # K and V, bf16
    free = gpus * gpu["hbm_GB"] * GB * 0.9 - weights
    seqs = int(free // (kv_per_token * cot_tokens)) if free > 0 else 0
    mem_bound = seqs * gpus * gpu["bw_TBps"] * 1e12 / weights  # one weight read per decode step
    compute_bound = gpus * gpu["bf16_TFLOPs"] * 1e12 / (2.0 * m.params())
    rate = min(mem_bound, compute_bound)
    return {"model": m.name, "gpus": gpus, "kv_MB_per_token": kv_per_token / 1e6, "seqs_at_8k": seqs,
            "roof_tok_s": rate, "hours_per_1M_at_roof": TOKENS / rate / 3600 if rate else float("inf")}


def gemm_gflops(n: int = 2048, reps: int = 3) -> float:
    """fp32 [n, n] x [n, n] rate of this CPU at torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _allreduce_worker(rank: int, world: int, port: int, sizes: list[int], out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    for d in sizes:
        t = torch.ones(d, d)
        dist.all_reduce(t)
        best = float("inf")
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            best = min(best, time.perf_counter() - t0)
        res[d] = best
    if rank == 0:
        out.update(res)
    dist.destroy_process_group()


def allreduce_seconds(sizes: list[int], world: int = 2, port: int = 29617) -> dict[int, float]:
    """Best-of-3 seconds of a gloo all-reduce of a float32 [d, d] Hessian between `world` local processes."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_allreduce_worker, args=(world, port, sizes, out), nprocs=world, join=True)
        return {int(k): float(v) for k, v in out.items()}


def dp_seconds(work: Path) -> dict[str, float]:
    """`compress` seconds (startup excluded) of a small model, one process with 2 threads vs torchrun with
    2 gloo ranks of 1 thread each, on the same 16k calibration tokens."""
    import subprocess
    import sys

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rac.data.segments import CALIB_SCHEMA
    from rac.engine import CompressConfig
    from rac.models.assets import tiny_model
    from rac.pruners import PruneConfig

    model = tiny_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    rng = np.random.default_rng(0)
    rows = [{"seq_id": i, "source": "bench", "input_ids": rng.integers(0, 500, 512).tolist(),
             "segment": [0] * 128 + [1] * 384} for i in range(32)]
    calib = work / "calib.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CALIB_SCHEMA), str(calib))
    cfg = CompressConfig(prune=PruneConfig(method="sparsegpt", sparsity=0.5), act_dtype="float32",
                         compute_dtype="float32", batch_tokens=4096)
    (work / "cfg.json").write_text(json.dumps(cfg.canonical()))
    single = ("import json,sys; from pathlib import Path; from rac.engine import CompressConfig, compress; "
              "cfg = CompressConfig(**json.loads(Path(sys.argv[4]).read_text())); "
              "print(json.dumps({'seconds': compress(sys.argv[1], sys.argv[2], sys.argv[3], cfg, sys.argv[5]).seconds}))")
    runs = {"1 process x 2 threads": ([sys.executable, "-c", single], "2"),
            "torchrun 2 ranks x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                             "--master_port", "29641", "-m", "rac.engine.torchrun"], "1")}
    out = {}
    for i, (label, (cmd, threads)) in enumerate(runs.items()):
        args = [str(model), str(calib), str(work / f"out{i}")]
        args += (["--config", str(work / "cfg.json"), "--work-dir", str(work / f"w{i}")] if "torch" in " ".join(cmd)
                 else [str(work / "cfg.json"), str(work / f"w{i}")])
        proc = subprocess.run([*cmd, *args], env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True,
                              text=True, check=True)
        out[label] = float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])
    return out


def main(results_dir: Path) -> None:
    sizes = [896, 2048, 4096]
    allreduce = allreduce_seconds(sizes)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dp = dp_seconds(Path(tmp))
    load = os.getloadavg()
    measured: dict[str, Any] = {"gemm_fp32_gflops": gemm_gflops(), "threads": torch.get_num_threads(),
                                "allreduce_s": allreduce, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                "load_avg": load, "dp_compress_s": dp}
    rows = [model_row(m, ranks=r, slots=s) for m in MODELS for r, s in ((1, 1), (8, 2))]
    for row in rows:
        row["shape"] = next(asdict(m) for m in MODELS if m.name == row["model"])
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Scaling model (bench/scaling.py)", "",
             f"Measured here ({measured['machine']}, load average {load[0]:.1f}: shared, noisy): "
             f"fp32 GEMM {measured['gemm_fp32_gflops']:.0f} GFLOP/s at {measured['threads']} threads; gloo all-reduce "
             "of a float32 [d, d] Hessian between 2 local ranks:", "",
             "| d | MB | seconds | GB/s (size / time) |", "|---|---|---|---|"]
    for d, s in sorted(allreduce.items()):
        mb = 4 * d * d / 1e6
        lines.append(f"| {d} | {mb:.1f} | {s:.3f} | {mb / 1e3 / s:.2f} |")
    lines += ["", "`compress` of a 2-layer Llama (hidden 512, MLP 2048, SparseGPT 50%, fp32) on 32 x 512 tokens, "
              "startup excluded (2 shared cores: ranks compete with each other and with other jobs):", "",
              "| run | seconds |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in dp.items()]
    lines += ["", "Model at 1M calibration tokens (bf16 weights and activations, float32 Hessians; "
              "ranks = data-parallel ranks, slots = Hessians per group: 1 merged, 2 prompt+decode):", "",
              "| model | ranks | slots | layer weights GB | act stores/rank GB | H qkv GB | H down GB | "
              "H peak GB | all-reduce/layer GB | stats PFLOP | forward PFLOP | SparseGPT PFLOP |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, row in zip(((1, 1), (8, 2)) * len(MODELS), rows, strict=True):
        lines.append(f"| {row['model']} | {r[0]} | {r[1]} | {row['layer_weights_GB']:.2f} | {row['act_store_GB']:.1f} | "
                     f"{row['H_qkv_GB']:.3f} | {row['H_down_GB']:.2f} | {row['H_peak_GB']:.2f} | "
                     f"{row['allreduce_per_layer_GB']:.2f} | {row['stats_PFLOP']:.1f} | {row['forward_PFLOP']:.1f} | "
                     f"{row['prune_PFLOP']:.2f} |")
    gens = [generation_row(m, g) for m, g in zip(MODELS, (1, 1, 2), strict=True)]
    lines += ["", "Generation roofline on H200s (bf16 weights, 8k-token CoTs, 90% of HBM usable; an upper bound, "
              "not a measurement):", "", "| model | GPUs (TP) | KV MB/token | CoTs in flight | roof tokens/s | "
              "minutes per 1M tokens at roof |", "|---|---|---|---|---|---|"]
    for g in gens:
        lines.append(f"| {g['model']} | {g['gpus']} | {g['kv_MB_per_token']:.3f} | {g['seqs_at_8k']} | "
                     f"{g['roof_tok_s']:.0f} | {60 * g['hours_per_1M_at_roof']:.1f} |")
    (results_dir / "scaling.json").write_text(json.dumps({"measured": measured, "models": rows,
                                                          "generation": gens}, indent=1))
    (results_dir / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(__file__).resolve().parent / "results")
