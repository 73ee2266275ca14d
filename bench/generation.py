"""Generation throughput on SmolLM2-135M-Instruct: vLLM vs transformers, batch sizes, bf16 vs fp32.

Every variant samples the same GSM8K prompts with the same per-sample seeds and cap; tokens/s counts the
generated tokens (EOS included) over the generation wall time, model loading excluded and reported apart.
Writes bench/results/generation.json and generation.md. Run: `python -m bench.generation`.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from rac.data.engines import Request, make_engine
from rac.data.generate import GenerateConfig, resolve_sampling, sample_seed, special_ids
from rac.data.prompts import PromptsConfig, sample_prompts
from rac.models.assets import smollm2_135m

N_PROMPTS = 8
MAX_NEW_TOKENS = 96
VARIANTS: tuple[tuple[str, str, int], ...] = (
    ("transformers", "bfloat16", 1),
    ("transformers", "bfloat16", 4),
    ("transformers", "bfloat16", 8),
    ("transformers", "float32", 8),
    ("vllm", "bfloat16", 8),
    ("vllm", "float32", 8),
)


def _requests(model_dir: Path, work: Path) -> list[Request]:
    pp = work / "prompts.parquet"
    sample_prompts(PromptsConfig(source="gsm8k", n=N_PROMPTS, seed=0), model_dir, pp)
    t = pq.read_table(pp)
    return [Request(ids, sample_seed(0, pid, 0), MAX_NEW_TOKENS)
            for pid, ids in zip(t.column("prompt_id").to_pylist(), t.column("input_ids").to_pylist(), strict=True)]


def run_variant(model_dir: Path, reqs: list[Request], engine: str, dtype: str, batch: int) -> dict[str, Any]:
    """Load one engine, generate once, and time it."""
    eos, pad = special_ids(model_dir)
    spec = resolve_sampling(GenerateConfig(temperature=0.6, top_p=0.95), model_dir, MAX_NEW_TOKENS)
    t0 = time.perf_counter()
    eng = make_engine(engine, model_dir, eos_ids=eos, pad_id=pad, dtype=dtype, batch_size=batch,
                      max_model_len=2048)
    load_s = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        comps = eng.generate(reqs, spec)
        gen_s = time.perf_counter() - t1
    finally:
        eng.close()
    new = sum(len(c.token_ids) for c in comps)
    return {"engine": engine, "dtype": dtype, "batch": batch, "load_s": round(load_s, 2),
            "gen_s": round(gen_s, 2), "new_tokens": new, "tokens_per_s": round(new / gen_s, 1),
            "length_capped": sum(c.finish_reason == "length" for c in comps)}


def _markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    head = ("| engine | dtype | batch | tokens/s | new tokens | gen s | load s | capped |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['engine']} | {r['dtype']} | {r['batch']} | {r['tokens_per_s']} | {r['new_tokens']} | "
                   f"{r['gen_s']} | {r['load_s']} | {r['length_capped']} |\n" for r in rows)
    return (f"# Generation throughput (SmolLM2-135M-Instruct)\n\n{N_PROMPTS} GSM8K prompts, 1 sample each, "
            f"cap {MAX_NEW_TOKENS} new tokens, temperature 0.6 / top-p 0.95, same seeds for every variant.\n"
            f"Machine: {env['cpus']} CPUs, torch threads {env['torch_threads']}, load average at start "
            f"{env['loadavg']} (shared machine: absolute numbers are noisy, compare rows).\n\n{head}{body}")


def main(results_dir: Path) -> None:
    """Run every variant and write generation.json / generation.md into `results_dir`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    md = smollm2_135m()
    env = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
           "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as work:
        reqs = _requests(md, Path(work))
    rows = []
    for engine, dtype, batch in VARIANTS:
        rows.append(run_variant(md, reqs, engine, dtype, batch))
        print(f"[generation] {rows[-1]}", flush=True)
    (results_dir / "generation.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    (results_dir / "generation.md").write_text(_markdown(rows, env))


if __name__ == "__main__":
    main(Path(__file__).resolve().parent / "results")
