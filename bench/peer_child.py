"""The llm-compressor side of `bench.peer`: runs inside llm-compressor's own venv (bench/.venv-peer).

    bench/.venv-peer/bin/python -m bench.peer_child '{"kind": "solver" | "oneshot", ...}'

Imports only the standard library, torch, transformers, datasets, safetensors and llmcompressor (never rac).
  solver   llm-compressor's own SparseGPT solver, `sparsify_weight` of
           llmcompressor/modifiers/pruning/sparsegpt/sgpt_sparsify.py, called directly on W, H read from a
           safetensors file (a fresh copy of H per call: the function modifies it in place); the best of
           `repeats` wall times; the last result is written to `out` for the parent to score.
  oneshot  `llmcompressor.oneshot` on a model folder loaded in float32 and rac's exported calibration set
           (`datasets.load_from_disk`, the `input_ids` / `attention_mask` columns: the same token ids rac
           calibrates on), batch_size 1, every sample, no shuffling, no truncation; the recipe is
           SparseGPTModifier or WandaPruningModifier with lm_head ignored (rac excludes it too). The
           measured region is model load + oneshot + `save_pretrained(out, save_compressed=False)` (cast to
           the checkpoint's storage dtype first, as rac writes it). Solver seconds are the time spent inside
           the modifiers' `sparsify_weight` calls (wrapped here); `stats_accumulate_s` the time inside their
           `accumulate_hessian` / `accumulate_row_scalars` calls (the statistics hooks).
  gptq     (`bench.peer_gptq`) `llmcompressor.oneshot` with GPTQModifier on a model folder loaded in `dtype`
           (bfloat16 or float32) and rac's exported calibration set, read as for oneshot above: scheme W4A16
           (int4, symmetric, group 128, the preset's observer), targets Linear, lm_head ignored, actorder None
           (off), dampening_frac `damp` (0.01: λ = 0.01 · mean diag H, as rac), block_size 128, the default
           sequential pipeline (one decoder layer at a time: its statistics from one calibration pass, then
           its linears quantized, then the quantized layer's outputs feed the next layer). The measured region
           is load + oneshot + `save_pretrained(out, save_compressed=True)` (a compressed-tensors
           pack-quantized folder). Solver seconds: time inside `quantize_weight`; `stats_accumulate_s`: inside
           `accumulate_hessian`. The resolved weight quantization args are returned as `settings`; the
           tokenizer is saved into the folder after the measured region.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)
from bench.peer_proc import Meter, emit


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets")}


def solver(args: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """Time llm-compressor's `sparsify_weight` on one fixed problem."""
    import torch
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(int(args["threads"]))
    tensors = load_file(args["problem"])
    W, H = tensors["W"], tensors["H"]  # [rows, cols], [cols, cols] float32
    n, m = args.get("nm") or (0, 0)
    linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    meter.start()
    times, loss, W_hat = [], 0.0, W
    for _ in range(int(args["repeats"])):
        hessians = {linear: H.clone()}
        t0 = time.perf_counter()
        with torch.no_grad():
            loss, W_hat = sparsify_weight(linear, hessians, sparsity=float(args["sparsity"]), prune_n=n,
                                          prune_m=m, block_size=128, dampening_frac=0.01,
                                          preserve_sparsity_mask=False)
        times.append(time.perf_counter() - t0)
    save_file({"W_hat": W_hat.contiguous()}, args["out"])
    return meter.result(seconds=min(times), times=times, solver_loss=float(loss), versions=_versions(),
                        torch_threads=torch.get_num_threads())


def _timed(fn: Callable[..., Any], acc: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc["seconds"] += time.perf_counter() - t0
            acc["calls"] += 1

    return wrapper


def _recipe(method: str, sparsity: float, nm: list[int] | None) -> Any:
    structure = f"{nm[0]}:{nm[1]}" if nm else "0:0"
    common = {"sparsity": sparsity, "mask_structure": structure, "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(**common)
    raise ValueError(f"peer method {method!r} not benchmarked; known: ['sparsegpt', 'wanda']")


def oneshot_run(args: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """llm-compressor's oneshot on the exported calibration set; writes the pruned model to `out`."""
    import datasets
    import llmcompressor.modifiers.pruning.sparsegpt.base as sgpt_base
    import llmcompressor.modifiers.pruning.wanda.base as wanda_base
    import torch
    from datasets import load_from_disk
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(args["threads"]))
    datasets.disable_caching()  # never write cache files into the exported calibration folder
    solver_acc = {"seconds": 0.0, "calls": 0.0}
    stats_acc = {"seconds": 0.0, "calls": 0.0}
    sgpt_base.sparsify_weight = _timed(sgpt_base.sparsify_weight, solver_acc)  # type: ignore[attr-defined]
    wanda_base.sparsify_weight = _timed(wanda_base.sparsify_weight, solver_acc)  # type: ignore[attr-defined]
    sgpt_base.accumulate_hessian = _timed(sgpt_base.accumulate_hessian, stats_acc)  # type: ignore[attr-defined]
    wanda_base.accumulate_row_scalars = _timed(wanda_base.accumulate_row_scalars,  # type: ignore[attr-defined]
                                               stats_acc)
    recipe = _recipe(args["method"], float(args["sparsity"]), args.get("nm"))
    meter.start()
    stamps = {}
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    storage = json.loads((Path(args["model"]) / "config.json").read_text()).get("dtype", "float32")
    ds = load_from_disk(args["calib"]).select_columns(["input_ids", "attention_mask"])
    max_len = max(len(x) for x in ds["input_ids"])
    stamps["load_s"] = time.perf_counter() - meter.t0
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ds),
            shuffle_calibration_samples=False, max_seq_length=max_len, batch_size=1)
    stamps["oneshot_s"] = time.perf_counter() - meter.t0 - stamps["load_s"]
    model.to(getattr(torch, storage)).save_pretrained(args["out"], save_compressed=False)
    stamps["save_s"] = time.perf_counter() - meter.t0 - stamps["load_s"] - stamps["oneshot_s"]
    n_tokens = sum(len(x) for x in ds["input_ids"])
    return meter.result(solver_s=solver_acc["seconds"], solver_calls=int(solver_acc["calls"]), stages=stamps,
                        stats_accumulate_s=stats_acc["seconds"], stats_calls=int(stats_acc["calls"]),
                        n_tokens=n_tokens, n_seqs=len(ds), versions=_versions(),
                        torch_threads=torch.get_num_threads(), storage_dtype=storage)


def gptq_modifier(damp: float, block_size: int = 128) -> Any:
    """GPTQModifier W4A16 (int4 symmetric, group 128) on every Linear but lm_head, act order off."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    return GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"], actorder=None,
                        dampening_frac=damp, block_size=block_size)


def gptq_run(args: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """llm-compressor's GPTQ W4A16 oneshot on the exported calibration set; writes the compressed folder."""
    import datasets
    import llmcompressor.modifiers.gptq.base as gptq_base
    import torch
    from datasets import load_from_disk
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(args["threads"]))
    datasets.disable_caching()
    solver_acc = {"seconds": 0.0, "calls": 0.0}
    stats_acc = {"seconds": 0.0, "calls": 0.0}
    gptq_base.quantize_weight = _timed(gptq_base.quantize_weight, solver_acc)  # type: ignore[attr-defined]
    gptq_base.accumulate_hessian = _timed(gptq_base.accumulate_hessian, stats_acc)  # type: ignore[attr-defined]
    recipe = gptq_modifier(float(args["damp"]))
    dtype = getattr(torch, args["dtype"])
    meter.start()
    stamps = {}
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=dtype)
    ds = load_from_disk(args["calib"]).select_columns(["input_ids", "attention_mask"])
    max_len = max(len(x) for x in ds["input_ids"])
    stamps["load_s"] = time.perf_counter() - meter.t0
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ds),
            shuffle_calibration_samples=False, max_seq_length=max_len, batch_size=1)
    stamps["oneshot_s"] = time.perf_counter() - meter.t0 - stamps["load_s"]
    model.save_pretrained(args["out"], save_compressed=True)
    stamps["save_s"] = time.perf_counter() - meter.t0 - stamps["load_s"] - stamps["oneshot_s"]
    weights = model.model.layers[0].self_attn.q_proj.quantization_scheme.weights
    settings = {"modifier": "GPTQModifier", "scheme": "W4A16", "targets": ["Linear"], "ignore": ["lm_head"],
                "actorder": None, "dampening_frac": recipe.dampening_frac, "block_size": recipe.block_size,
                "pipeline": "independent (sequential for GPTQ: one decoder layer at a time)", "batch_size": 1,
                "dtype": args["dtype"], "weights": weights.model_dump(mode="json")}
    n_tokens = sum(len(x) for x in ds["input_ids"])
    result = meter.result(solver_s=solver_acc["seconds"], solver_calls=int(solver_acc["calls"]), stages=stamps,
                          stats_accumulate_s=stats_acc["seconds"], stats_calls=int(stats_acc["calls"]),
                          n_tokens=n_tokens, n_seqs=len(ds), versions=_versions(), settings=settings,
                          torch_threads=torch.get_num_threads())
    from transformers import AutoTokenizer  # after the measured region: the folder is then servable as it is

    AutoTokenizer.from_pretrained(args["model"]).save_pretrained(args["out"])
    return result


def main(argv: list[str]) -> None:
    meter = Meter()
    args = json.loads(argv[1])
    if args["kind"] == "solver":
        emit(solver(args, meter))
    elif args["kind"] == "oneshot":
        emit(oneshot_run(args, meter))
    elif args["kind"] == "gptq":
        emit(gptq_run(args, meter))
    else:
        raise SystemExit(f"unknown kind {args['kind']!r}; known: solver, oneshot, gptq")


if __name__ == "__main__":
    main(sys.argv)
