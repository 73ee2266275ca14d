"""rac GPTQ vs llm-compressor GPTQ, W4A16, side by side on the same calibration tokens (rac issue 18).

    .venv/bin/python -m bench.peer_gptq [--run-id RUN] [--work-dir work/results-gptq] [--threads 1]
        [--rounds 2] [--loss-seqs 12] [--nll-seqs 32] [--out bench/results]

Model: the real Qwen2.5-Coder-0.5B-Instruct (`qwen2.5-coder-0.5b`, converted in ~/.cache/rac). Inputs, copied
once into bench/.cache/peer-gptq/ and never written back (the run's work dir is only read):
  calibration  the `rac` calibration set (prompt + the dense model's own CoTs, 16384 tokens) of run RUN, exported
               with `rac --work-dir WORK export-calibration RUN rac DEST` (what llm-compressor reads) plus the
               Parquet that export names (what rac's engine reads), checked to hold the same token ids;
  held out     the dense model's greedy CoTs on the run's held-out GSM8K problems (its `eval/dense` stage).
Compression, one fresh child process at a time, OMP/MKL threads fixed, the tools alternating (round r: rac
first when r is even): rac `compress` (bench.peer_rac) with {method: gptq, bits: 4, group_size: 128} (act order
off, damp 0.01), sequential: layer, bfloat16 compute and activations; llm-compressor `oneshot` with
GPTQModifier W4A16 (bench.peer_child kind gptq: int4 symmetric group 128, lm_head ignored, actorder None,
dampening_frac 0.01, block_size 128), the model loaded in bfloat16. Both write compressed-tensors pack-quantized
folders. Reference rows (not timed): round-to-nearest with rac's grid (scale = max|w| / 7) and with
llm-compressor's (max|w| / 7.5, the full [-8, 7] range).
Scoring, the same code for every folder (forwards and error matmuls in --score-dtype, bfloat16 by default):
  per linear   relative output error ||(W - Ŵ) X||² / ||W X||² (sums over tokens) on the dense model's inputs X
               to that linear over a fixed token set (the first --loss-seqs held-out sequences, prompt + CoT);
               Ŵ = codes * scale read from the folder's packed tensors (`folder_codes`);
  NLL          `rac.eval.proxies` on the dense model's held-out CoTs: NLL gap to dense, top-1 agreement, KL,
               and the paired rac - llm-compressor NLL difference with a bootstrap interval over sequences.
Writes peer-gptq.json and peer-gptq.md (bench/results/, or --out); the folders stay in bench/.cache/peer-gptq/out/.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.peer import ensure_peer_venv, parse_versions, run_child
from bench.solvers import machine, write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache" / "peer-gptq"
RAC_BIN = Path(sys.executable).with_name("rac")
MODEL = "qwen2.5-coder-0.5b"
DTYPE = "bfloat16"
DAMP = 0.01
GROUP = 128
# rac's default grid since the option (rac.pruners.quant): max|w| / 7.5, scales taken in the sweep; the results
# recorded before it (no "grid" in rac_prune) ran max|w| / 7
PRUNE = {"method": "gptq", "bits": 4, "group_size": GROUP, "act_order": False, "damp": DAMP, "grid": "full"}
LINEAR_RE = re.compile(r"^(.*\.layers\.(\d+)\.[^.]+\.([a-z_]+proj))\.weight_packed$")
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- pure helpers (tests/test_bench_peer_gptq.py)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Signed codes int8 [rows, cols] from compressed-tensors `pack_to_int32` words [rows, ceil(cols / p)]:
    column j sits in bits bits·(j mod p) ... of word j / p (p = 32 / bits) as code + 2^(bits-1)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits  # [p]
    # an arithmetic shift of a negative word fills with ones, which the mask drops
    fields = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)  # [rows, W, p]
    return (fields.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Ŵ [rows, cols] float32 = q * scale[:, j // (cols / G)] for q [rows, cols], scale [rows, G]."""
    rows, cols = q.shape
    groups = scale.shape[1]
    return (q.reshape(rows, groups, cols // groups).float() * scale.float()[:, :, None]).reshape(rows, cols)


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """||(W - Ŵ) X||² / ||W X||² over all tokens: X [T, in] rows are tokens, W, Ŵ [out, in]."""
    num, den = output_error_sums(W, W_hat, X)
    return num / den


def output_error_sums(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(||X (W - Ŵ)ᵀ||², ||X Wᵀ||²): W - Ŵ formed in float32, the matmuls in `dtype` (bfloat16: float32
    accumulation inside the kernel, 4x faster on this CPU), squares summed in float64."""
    Xd, Wf = X.to(dtype), W.float()
    err = (Xd @ (Wf - W_hat.float()).to(dtype).T).float().square().sum(dtype=torch.float64)
    ref = (Xd @ Wf.to(dtype).T).float().square().sum(dtype=torch.float64)
    return float(err), float(ref)


def layer_means(rel: dict[str, float]) -> dict[int, float]:
    """Mean relative error of each decoder layer's linears ({'model.layers.3.mlp.up_proj': e} -> {3: mean})."""
    per: dict[int, list[float]] = {}
    for name, e in rel.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            per.setdefault(int(m.group(1)), []).append(e)
    return {k: float(np.mean(v)) for k, v in sorted(per.items())}


def type_means(rel: dict[str, float]) -> dict[str, float]:
    """Mean relative error per linear type (q_proj, ..., down_proj) over layers."""
    return {t: float(np.mean([e for n, e in rel.items() if n.endswith("." + t)])) for t in TYPES
            if any(n.endswith("." + t) for n in rel)}


# ---------------------------------------------------------------- folders


@dataclass(frozen=True)
class Codes:
    """One quantized linear as served: int8 codes [out, in] and float32 scales [out, G]."""

    q: torch.Tensor
    scale: torch.Tensor


def folder_codes(folder: Path) -> dict[str, Codes]:
    """Every pack-quantized linear of a compressed-tensors folder ({module name: Codes}); symmetric only."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    bits, sym = int(group["weights"]["num_bits"]), bool(group["weights"]["symmetric"])
    if config["format"] != "pack-quantized" or not sym or group["weights"].get("actorder") == "group":
        raise ValueError(f"{folder}: only symmetric pack-quantized folders without g_idx are read, got {config}")
    out: dict[str, Codes] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                m = LINEAR_RE.match(key)
                if not m:
                    continue
                name = m.group(1)
                rows, cols = (int(x) for x in f.get_tensor(name + ".weight_shape"))
                q = unpack_int32(f.get_tensor(key), bits, cols)
                if q.shape[0] != rows:
                    raise ValueError(f"{folder}: {name} packed rows {q.shape[0]} != weight_shape {rows}")
                out[name] = Codes(q, f.get_tensor(name + ".weight_scale").float())
    if not out:
        raise ValueError(f"{folder}: no pack-quantized linears")
    return out


def folder_sha(folder: Path) -> str:
    """sha256 over the folder's safetensors files (name and bytes, in name order)."""
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.name.encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def folder_format(folder: Path) -> dict[str, Any]:
    """Tensor names -> (dtype, shape) and the weights' quantization args, to compare two writers' folders."""
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                s = f.get_slice(k)
                tensors[k] = [s.get_dtype(), list(s.get_shape())]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    return {"tensors": tensors, "weights": group["weights"], "ignore": qc.get("ignore"), "format": qc["format"]}


def compare_formats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Which tensors differ in presence, dtype or shape, and which weight args differ."""
    ta, tb = a["tensors"], b["tensors"]
    return {"only_first": sorted(set(ta) - set(tb)), "only_second": sorted(set(tb) - set(ta)),
            "dtype_or_shape": sorted(k for k in set(ta) & set(tb) if ta[k] != tb[k]),
            "weights_args": {k: [a["weights"].get(k), b["weights"].get(k)]
                             for k in sorted(set(a["weights"]) | set(b["weights"]))
                             if a["weights"].get(k) != b["weights"].get(k)},
            "ignore": [a["ignore"], b["ignore"]]}


def rtn_minmax_grid(W: torch.Tensor, levels: float) -> Any:
    """RTN onto the symmetric int4 group-128 grid with scale bf16(max|w| / levels), codes clamped to [-8, 7]
    (levels 7: rac's grid; 7.5: compressed-tensors' memoryless_minmax, which uses the whole [-8, 7] range)."""
    from rac.pruners.quant import QuantizedWeight, QuantSpec

    spec = QuantSpec(bits=4, group_size=GROUP)
    Wf = W.float()
    out, cols = Wf.shape
    tiles = Wf.reshape(-1, GROUP)
    amax = tiles.abs().amax(1, keepdim=True)
    scale = (amax / levels).to(torch.bfloat16).float()
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(tiles / scale), -8, 7).reshape(out, cols)
    return QuantizedWeight(q=q.to(torch.int8), scale=scale.reshape(out, cols // GROUP), g_idx=None, spec=spec)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    calib_parquet: Path
    calib_export: Path
    heldout_cots: Path
    info: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sql(work_dir: Path, query: str) -> list[dict[str, Any]]:
    out = subprocess.run([str(RAC_BIN), "--work-dir", str(work_dir), "sql", query, "--format", "json"],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return list(json.loads(out.stdout))


def prepare_inputs(work_dir: Path, run_id: str | None, cache: Path = CACHE) -> Inputs:
    """Export/copy the run's rac calibration set and dense held-out CoTs into `cache` once (work_dir is read only)."""
    cache.mkdir(parents=True, exist_ok=True)
    export, parquet, cots = cache / "calib-export", cache / "calib.parquet", cache / "dense-eval-cots"
    if not (export / "rac_calibration.json").exists():
        if run_id is None:
            raise SystemExit(f"no cached export in {export}: pass --run-id (see `rac --work-dir {work_dir} status`)")
        subprocess.run([str(RAC_BIN), "--work-dir", str(work_dir), "export-calibration", run_id, "rac", str(export)],
                       check=True, cwd=ROOT)
    side = json.loads((export / "rac_calibration.json").read_text())
    if not parquet.exists():
        shutil.copyfile(side["source"]["path"], parquet)
    if _sha256(parquet) != side["source"]["sha256"]:
        raise ValueError(f"{parquet} is not the Parquet the export was made from ({side['source']})")
    if not cots.exists():
        if run_id is None:
            raise SystemExit(f"no cached held-out CoTs in {cots}: pass --run-id")
        from rac.eval.evaluate import eval_cots_dir
        from rac.store.artifacts import ArtifactRef

        (row,) = _sql(work_dir, f"select outputs from stages where run_id = '{run_id}' and name = 'eval/dense'")
        ref = next(r for r in map(ArtifactRef.from_json, json.loads(row["outputs"])) if r.kind == "eval-rows")
        shutil.copytree(eval_cots_dir(ref.path), cots)
    _check_same_tokens(parquet, export)
    return Inputs(parquet, export, cots, {"run_id": run_id, "work_dir": str(work_dir), "calibration": {
        k: side[k] for k in ("kind", "n_seqs", "n_tokens", "decode_share", "prompt_share", "max_seq_len", "source")}})


def _check_same_tokens(parquet: Path, export: Path) -> None:
    import datasets

    a = pq.read_table(parquet, columns=["input_ids"]).column("input_ids").to_pylist()
    b = datasets.load_from_disk(str(export))["input_ids"]
    if [list(x) for x in a] != [list(x) for x in b]:
        raise ValueError(f"{export} does not hold the token ids of {parquet}")


# ---------------------------------------------------------------- scoring (one code path for every folder)


def heldout_sequences(cots: Path, n: int, max_tokens: int) -> list[Any]:
    """The first `n` held-out CoTs in rac.eval.proxies' seeded selection (prompt + CoT ids, cut)."""
    from rac.eval.proxies import ProxyConfig, load_cot_table, select_sequences

    seqs, _ = select_sequences(load_cot_table(cots), ProxyConfig(n_sequences=10**6, max_tokens=max_tokens))
    return seqs[:n]


def linear_errors(dense_dir: Path, folders: dict[str, Path], seqs: list[list[int]],
                  dtype: torch.dtype = torch.bfloat16, batch_size: int = 6) -> dict[str, dict[str, Any]]:
    """Per folder and decoder linear: (num, den, rel) of the relative output error on the dense model's inputs.

    The dense model (in `dtype`) runs the sequences once, `batch_size` at a time (right-padded: causal attention
    keeps the real tokens exact, and padded positions are dropped); a forward pre-hook on every quantized linear
    takes its input X [T, in] at the real tokens and adds `output_error_sums(W, Ŵ, X, dtype)` for every folder's
    Ŵ (float32 codes * scales, dequantized on the fly; W the dense checkpoint's weight)."""
    from rac.models.loading import load_causal_lm

    codes = {label: folder_codes(f) for label, f in folders.items()}
    names = sorted(set.intersection(*(set(c) for c in codes.values())))
    if any(set(c) != set(names) for c in codes.values()):
        raise ValueError("the folders quantize different linears")
    model = load_causal_lm(dense_dir, dtype)
    sums = {label: {n: [0.0, 0.0] for n in names} for label in folders}
    handles = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m: torch.nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            X = args[0][real]  # [T, in]: the real tokens of the batch
            for label in folders:
                c = codes[label][name]
                num, den = output_error_sums(m.weight, dequantize(c.q, c.scale), X, dtype)  # type: ignore[arg-type]
                sums[label][name][0] += num
                sums[label][name][1] += den

        handles.append(mod.register_forward_pre_hook(hook))
    real = torch.zeros(0, dtype=torch.bool)
    try:
        with torch.inference_mode():
            for i in range(0, len(seqs), batch_size):
                group = seqs[i: i + batch_size]
                width = max(len(x) for x in group)
                ids = torch.zeros(len(group), width, dtype=torch.long)  # [B, L]
                real = torch.zeros(len(group), width, dtype=torch.bool)  # [B, L]
                for r, x in enumerate(group):
                    ids[r, : len(x)] = torch.tensor(x)
                    real[r, : len(x)] = True
                # the decoder only: the lm_head is not quantized
                model.model(input_ids=ids, attention_mask=real.long())
    finally:
        for h in handles:
            h.remove()
        del model
        gc.collect()
    return {label: {n: {"num": s[0], "den": s[1], "rel": s[0] / s[1]} for n, s in per.items()}
            for label, per in sums.items()}


def nll_scores(dense_dir: Path, folders: dict[str, Path], cots: Path, n: int, max_tokens: int,
               dtype: str = "bfloat16") -> dict[str, Any]:
    """rac.eval.proxies on the dense model's held-out CoTs: one dense pass, then each folder (models in `dtype`,
    log-probabilities in float32)."""
    from rac.eval.proxies import (
        ProxyConfig,
        check_models,
        dense_pass,
        load_cot_table,
        make_batches,
        pruned_pass,
        ratio_interval,
        select_sequences,
    )

    cfg = ProxyConfig(n_sequences=n, max_tokens=max_tokens, batch_size=4, dtype=dtype)  # type: ignore[arg-type]
    seqs, n_cut = select_sequences(load_cot_table(cots), cfg)
    for f in folders.values():
        check_models(dense_dir, f, seqs)
    batches = make_batches(seqs, cfg.batch_size, 0)
    dense = dense_pass(dense_dir, batches, cfg)
    out: dict[str, Any] = {"config": cfg.canonical(), "n_truncated": n_cut, "cot_ids": [s.cot_id for s in seqs]}
    for label, f in folders.items():
        t0 = time.perf_counter()
        per = {k: v.numpy() for k, v in pruned_pass(f, batches, dense, cfg, len(seqs)).items()}
        n_pos = float(per["n"].sum())
        gap = per["pruned_nll"] - per["dense_nll"]
        out[label] = {"dense_nll": float(per["dense_nll"].sum()) / n_pos, "nll": float(per["pruned_nll"].sum()) / n_pos,
                      "nll_gap": float(gap.sum()) / n_pos, "nll_gap_ci": list(ratio_interval(gap, per["n"], 2000)),
                      "top1": float(per["agree"].sum()) / n_pos,
                      "top1_ci": list(ratio_interval(per["agree"], per["n"], 2000)),
                      "kl": float(per["kl"].sum()) / n_pos, "kl_ci": list(ratio_interval(per["kl"], per["n"], 2000)),
                      "positions": int(n_pos), "seconds": time.perf_counter() - t0,
                      "per_sequence": {k: v.tolist() for k, v in per.items()}}
    return out


def paired(a: dict[str, Any], b: dict[str, Any], key: str = "pruned_nll") -> dict[str, Any]:
    """Per-token mean of a - b over the same sequences, with its 95% bootstrap interval (sequences resampled)."""
    from rac.eval.proxies import ratio_interval

    n = np.asarray(a["per_sequence"]["n"])
    if not np.array_equal(n, np.asarray(b["per_sequence"]["n"])):
        raise ValueError("paired differences need the same scored sequences")
    d = np.asarray(a["per_sequence"][key]) - np.asarray(b["per_sequence"][key])
    lo, hi = ratio_interval(d, n, 2000)
    return {"diff": float(d.sum() / n.sum()), "ci": [lo, hi]}


# ---------------------------------------------------------------- the run


def build_rtn_reference(dense_dir: Path, out: Path, levels: float) -> Path:
    """RTN folder with scale max|w| / `levels` through rac's compressed-tensors writer."""
    from bench.serving import build_rtn_folder

    if not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        build_rtn_folder(dense_dir, out, quantize=lambda W: rtn_minmax_grid(W, levels), method=f"rtn max/{levels}")
    return out


def compress_jobs(model: Path, inputs: Inputs, out_root: Path, tmp: Path, threads: int,
                  rounds: int) -> list[dict[str, Any]]:
    """rac and llm-compressor, alternating, `rounds` times; each output folder kept under `out_root`."""
    from rac.engine import CompressConfig

    cfg = CompressConfig.model_validate({"prune": PRUNE, "sequential": "layer", "compute_dtype": DTYPE,
                                         "act_dtype": DTYPE})
    records = []
    for r in range(rounds):
        for tool in (("rac", "peer") if r % 2 == 0 else ("peer", "rac")):
            out = out_root / f"{tool}-r{r}"
            shutil.rmtree(out, ignore_errors=True)
            args: dict[str, Any]
            if tool == "rac":
                args = {"kind": "compress", "model": str(model), "calib": str(inputs.calib_parquet), "out": str(out),
                        "work": str(tmp / "work"), "cfg": cfg.canonical()}
            else:
                args = {"kind": "gptq", "model": str(model), "calib": str(inputs.calib_export), "out": str(out),
                        "damp": DAMP, "dtype": DTYPE}
            res = run_child(tool, args, threads)
            shutil.rmtree(tmp / "work", ignore_errors=True)
            res.update(round=r, folder=str(out), sha256=folder_sha(out))
            cpu = res["usage"]["user_s"] + res["usage"]["system_s"]
            print(f"[peer-gptq] round {r} {tool}: wall {res['wall_s']:.0f} s, cpu {cpu:.0f} s, solver "
                  f"{res['solver_s']:.0f} s, peak {res['peak_rss_mb']:.0f} MiB, load {res['load_before'][0]:.1f}"
                  f" -> {res['load_after'][0]:.1f}", flush=True)
            records.append(res)
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _parse(argv)
    if a.report_only:
        res = json.loads((a.out / "peer-gptq.json").read_text())
        write_atomic(a.out / "peer-gptq.md", to_markdown(res))
        return dict(res)
    from rac.models.assets import resolve_model

    torch.set_num_threads(a.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results: dict[str, Any] = {"command": " ".join(["python -m bench.peer_gptq", *(argv if argv is not None else
                                                                                 sys.argv[1:])]),
                               "machine": {k: v for k, v in machine().items() if k != "command"}, "started": started, "load_at_start": list(os.getloadavg()),
                               "threads": a.threads, "dtype": DTYPE, "score_dtype": a.score_dtype, "rac_prune": PRUNE, "rac_sequential": "layer"}
    results["versions"] = {"peer": ensure_peer_venv(), "rac": parse_versions()}
    model = resolve_model(MODEL)
    inputs = prepare_inputs(a.work_dir, a.run_id)
    results.update(model={"alias": MODEL, "path": str(model)}, inputs=inputs.info)
    out_root = CACHE / "out"
    tmp = Path(tempfile.mkdtemp(prefix="rac-bench-peer-gptq-"))
    runs_file = CACHE / "runs.json"  # the timing rows, kept so that --score-only can rescore the same folders
    try:
        if a.score_only:
            results["runs"] = json.loads(runs_file.read_text())
        else:
            results["runs"] = compress_jobs(model, inputs, out_root, tmp, a.threads, a.rounds)
            write_atomic(runs_file, json.dumps(results["runs"], indent=1, default=str) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    folders = {"rac": out_root / "rac-r0", "llm-compressor": out_root / "peer-r0",
               "rtn max/7 (rac grid)": build_rtn_reference(model, CACHE / "rtn-7", 7.0),
               "rtn max/7.5 (llm-compressor grid)": build_rtn_reference(model, CACHE / "rtn-7.5", 7.5)}
    results["format"] = compare_formats(folder_format(folders["rac"]), folder_format(folders["llm-compressor"]))
    results["format"].pop("tensors", None)
    results["codes"] = _code_agreement(folder_codes(folders["rac"]), folder_codes(folders["llm-compressor"]))
    seqs = heldout_sequences(inputs.heldout_cots, a.loss_seqs, a.max_tokens)
    t0 = time.perf_counter()
    errs = linear_errors(model, folders, [s.ids for s in seqs], getattr(torch, a.score_dtype))
    results["loss"] = {"token_set": {"sequences": [s.cot_id for s in seqs], "tokens": sum(len(s.ids) for s in seqs)},
                       "seconds": time.perf_counter() - t0, "per_linear": errs}
    print(f"[peer-gptq] per-linear errors in {results['loss']['seconds']:.0f} s", flush=True)
    results["nll"] = nll_scores(model, folders, inputs.heldout_cots, a.nll_seqs, a.max_tokens, a.score_dtype)
    results["nll"]["paired_rac_minus_peer"] = paired(results["nll"]["rac"], results["nll"]["llm-compressor"])
    results.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), load_at_end=list(os.getloadavg()))
    a.out.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out / "peer-gptq.json", json.dumps(results, indent=1, default=str) + "\n")
    write_atomic(a.out / "peer-gptq.md", to_markdown(results))
    print(to_markdown(results))
    return results


def _code_agreement(a: dict[str, Codes], b: dict[str, Codes]) -> dict[str, float]:
    """Share of equal codes and the median scale ratio b / a over all linears."""
    eq = sum(int((a[n].q == b[n].q).sum()) for n in a)
    total = sum(a[n].q.numel() for n in a)
    ratios = torch.cat([(b[n].scale / a[n].scale).flatten() for n in a])
    return {"equal_codes_share": eq / total, "median_scale_ratio_peer_over_rac": float(ratios.median()),
            "code_minus8_share_rac": sum(int((a[n].q == -8).sum()) for n in a) / total,
            "code_minus8_share_peer": sum(int((b[n].q == -8).sum()) for n in b) / total}


# ---------------------------------------------------------------- report


def _cpu(r: dict[str, Any]) -> float:
    return float(r["usage"]["user_s"] + r["usage"]["system_s"])


def _rel(per: dict[str, Any]) -> dict[str, float]:
    return {n: float(v["rel"]) for n, v in per.items()}


def _fmt_ci(x: float, ci: Iterable[float], f: str = "{:.4f}") -> str:
    lo, hi = ci
    return f"{f.format(x)} [{f.format(lo)}, {f.format(hi)}]"


def to_markdown(res: dict[str, Any]) -> str:
    v, m = res["versions"], res["machine"]
    lines = [f"# rac GPTQ vs llm-compressor GPTQ, W4A16 g128, {res['model']['alias']}", "",
             f"Command: `{res['command']}` ({res['started']} - {res['finished']}). Machine: {m['cpu']}, "
             f"{m['cores']} cores shared with other jobs (load average {res['load_at_start'][0]:.1f} at start, "
             f"{res['load_at_end'][0]:.1f} at end); {res['threads']} thread(s) for every child "
             f"(OMP/MKL_NUM_THREADS). rac {v['rac']['rac']} (torch {v['rac']['torch']}, transformers "
             f"{v['rac']['transformers']}); llm-compressor {v['peer']['llmcompressor']} (compressed-tensors "
             f"{v['peer']['compressed-tensors']}, torch {v['peer']['torch']}, transformers {v['peer']['transformers']}).",
             "", _settings(res), "", "## Summary", "", *_summary(res), "",
             "## Time and memory (fresh process each, one at a time, alternating)", "",
             "| round | tool | wall s | CPU s (user + sys) | solver s | stats s | peak RSS MiB | load 1-min before -> after "
             "| output sha256 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        stats = f"{r['stats_accumulate_s']:.0f}" if "stats_accumulate_s" in r else "-"
        lines.append(f"| {r['round']} | {'rac' if r['tool'] == 'rac' else 'llm-compressor'} | {r['wall_s']:.0f} | "
                     f"{_cpu(r):.0f} | {r['solver_s']:.1f} | {stats} | {r['peak_rss_mb']:.0f} | "
                     f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} | {r['sha256'][:12]} |")
    lines += ["", "rac solver s: the sum of its per-linear solver times (Hessian factorisation + sweep); "
              "llm-compressor: time inside `quantize_weight`, its stats s inside `accumulate_hessian` (rac's "
              "statistics are fused into its layer forward and not timed apart).", ""]
    errs = {k: _rel(x) for k, x in res["loss"]["per_linear"].items()}
    labels = list(errs)
    ts = res["loss"]["token_set"]
    lines += [f"## Loss per linear: ||(W - Ŵ) X||² / ||W X||² on the dense model's inputs ({ts['tokens']} tokens: "
              f"{len(ts['sequences'])} held-out sequences, prompt + the dense model's CoT)", "",
              f"X: inputs of every linear in the dense model's {res['score_dtype']} forward; Ŵ = codes x scales "
              f"(float32) read from each folder; matmuls in {res['score_dtype']}, sums in float64.", "",
              "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines.append("| mean over linears | " + " | ".join(f"{np.mean(list(e.values())):.5f}" for e in errs.values()) + " |")
    tm = {k: type_means(e) for k, e in errs.items()}
    for t in TYPES:
        lines.append(f"| {t} (mean over layers) | " + " | ".join(f"{tm[k][t]:.5f}" for k in labels) + " |")
    rac, peer = errs["rac"], errs["llm-compressor"]
    ratio = np.array([rac[n] / peer[n] for n in rac])
    lines += ["", f"rac / llm-compressor per linear: geometric mean {np.exp(np.log(ratio).mean()):.4f}, median "
              f"{np.median(ratio):.4f}, range {ratio.min():.3f}-{ratio.max():.3f}; rac lower on "
              f"{int((ratio < 1).sum())} of {len(ratio)} linears.", "", "Per decoder layer (mean over its 7 linears):", "",
              "| layer | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lm = {k: layer_means(e) for k, e in errs.items()}
    for layer in lm["rac"]:
        lines.append(f"| {layer} | " + " | ".join(f"{lm[k][layer]:.5f}" for k in labels) + " |")
    nll = res["nll"]
    lines += ["", f"## NLL on the dense model's held-out CoTs (rac.eval.proxies, {nll['config']['dtype']}, {len(nll['cot_ids'])} "
              f"sequences, max {nll['config']['max_tokens']} tokens)", "",
              f"Dense NLL {nll['rac']['dense_nll']:.4f} nats/token over {nll['rac']['positions']} CoT positions.", "",
              "| model | NLL | NLL gap [95% CI] | top-1 agreement | KL |", "|---|---|---|---|---|"]
    for k in labels:
        x = nll[k]
        lines.append(f"| {k} | {x['nll']:.4f} | {_fmt_ci(x['nll_gap'], x['nll_gap_ci'])} | {x['top1']:.4f} | "
                     f"{_fmt_ci(x['kl'], x['kl_ci'])} |")
    p = nll["paired_rac_minus_peer"]
    c = res["codes"]
    lines += ["", f"Paired rac - llm-compressor NLL: {_fmt_ci(p['diff'], p['ci'], '{:+.4f}')} nats/token.", "",
              "## The two folders", "",
              f"Same compressed-tensors layout: tensors only in rac's {res['format']['only_first'] or 'none'}, only in "
              f"llm-compressor's {res['format']['only_second'] or 'none'}, dtype/shape differences "
              f"{res['format']['dtype_or_shape'] or 'none'}; weight args that differ: {res['format']['weights_args']}. "
              f"Codes equal for {c['equal_codes_share']:.3f} of the weights; median scale ratio llm-compressor / rac "
              f"{c['median_scale_ratio_peer_over_rac']:.4f}; code -8 used by {c['code_minus8_share_rac']:.4f} (rac) "
              f"and {c['code_minus8_share_peer']:.4f} (llm-compressor) of the weights.", ""]
    return "\n".join(lines) + "\n"


def _summary(res: dict[str, Any]) -> list[str]:
    """What the tables say, from the numbers: where rac is faster, slower, better or worse."""
    def span(tool: str, f: Any) -> str:
        xs = [f(r) for r in res["runs"] if r["tool"] == tool]
        return f"{min(xs):.0f}-{max(xs):.0f}" if len(xs) > 1 else f"{xs[0]:.0f}"

    def mean(tool: str, f: Any) -> float:
        return float(np.mean([f(r) for r in res["runs"] if r["tool"] == tool]))

    errs = {k: _rel(x) for k, x in res["loss"]["per_linear"].items()}
    rac, peer = errs["rac"], errs["llm-compressor"]
    r7, r75 = errs["rtn max/7 (rac grid)"], errs["rtn max/7.5 (llm-compressor grid)"]
    ratio = {n: rac[n] / peer[n] for n in rac}
    better = sorted((n for n in ratio if ratio[n] < 0.9), key=ratio.__getitem__)
    nll, p = res["nll"], res["nll"]["paired_rac_minus_peer"]
    resolved = "resolved" if p["ci"][0] > 0 or p["ci"][1] < 0 else "not resolved at this size"
    out = []
    if res["runs"]:
        out.append(
            f"- Time and memory (rac / llm-compressor, mean of the rounds): CPU time "
            f"{mean('rac', _cpu) / mean('peer', _cpu):.2f}x ({span('rac', _cpu)} s vs {span('peer', _cpu)} s), wall "
            f"{mean('rac', lambda r: r['wall_s']) / mean('peer', lambda r: r['wall_s']):.2f}x "
            f"({span('rac', lambda r: r['wall_s'])} s vs {span('peer', lambda r: r['wall_s'])} s, shared cores), "
            f"solver {mean('rac', lambda r: r['solver_s']) / mean('peer', lambda r: r['solver_s']):.2f}x, peak RSS "
            f"{mean('rac', lambda r: r['peak_rss_mb']) / mean('peer', lambda r: r['peak_rss_mb']):.2f}x. Each tool's "
            f"output is bit-identical across rounds: {_identical(res)}.")
    out.append(
        f"- Loss: rac's output error is higher than llm-compressor's on {sum(x > 1 for x in ratio.values())} of "
        f"{len(ratio)} linears (rac / llm-compressor: geometric mean {np.exp(np.mean(np.log(list(ratio.values())))):.3f}x, mean over "
        f"linears {np.mean(list(rac.values())):.5f} vs {np.mean(list(peer.values())):.5f}: llm-compressor "
        f"{np.mean(list(peer.values())) / np.mean(list(rac.values())):.3f}x rac). The grid accounts for a large part "
        f"of it: RTN with llm-compressor's scale (max|w| / 7.5, codes -8..7) has "
        f"{np.mean(list(r75.values())) / np.mean(list(r7.values())):.3f}x the mean error of RTN with rac's (max|w| / 7, "
        f"-8 never used), a step 7/7.5 as large. Where rac is better ({', '.join(f'{n} {ratio[n]:.2f}x' for n in better) or 'none'}), "
        f"rac's grid is better already under RTN ({', '.join(f'{r7[n] / r75[n]:.2f}x' for n in better) or '-'}, "
        f"rac-grid RTN / llm-compressor-grid RTN): under max|w| / 7.5 a group's largest positive weight lands on "
        f"7.5 and is clipped to 7 (half a step off), under max|w| / 7 it is exact; likely these down_proj layers "
        f"carry large weights on their high-energy inputs (not isolated further here).")
    out.append(
        f"- NLL on held-out CoTs: gap to dense {nll['rac']['nll_gap']:.4f} (rac) vs {nll['llm-compressor']['nll_gap']:.4f} "
        f"(llm-compressor), RTN {nll['rtn max/7 (rac grid)']['nll_gap']:.4f} / {nll['rtn max/7.5 (llm-compressor grid)']['nll_gap']:.4f}; "
        f"paired rac - llm-compressor {_fmt_ci(p['diff'], p['ci'], '{:+.4f}')}, {resolved}.")
    return out


def _identical(res: dict[str, Any]) -> str:
    shas = {t: {r["sha256"] for r in res["runs"] if r["tool"] == t} for t in ("rac", "peer")}
    return ", ".join(f"{'rac' if t == 'rac' else 'llm-compressor'} {'yes' if len(v) == 1 else 'no'}"
                     for t, v in shas.items())


def _settings(res: dict[str, Any]) -> str:
    peer = next((r["settings"] for r in res["runs"] if r["tool"] == "peer"), None)
    calib = res["inputs"]["calibration"]
    return (f"Calibration: the `{calib['kind']}` set of run `{res['inputs']['run_id']}` ({calib['n_seqs']} sequences, "
            f"{calib['n_tokens']} tokens, decode share {calib['decode_share']:.3f}), the same token ids for both "
            f"(rac reads the Parquet, llm-compressor its `rac export-calibration` dataset; checked equal). "
            f"Both in {res['dtype']} (model, layer forward, stored activations); GPTQ itself in float32 in both. "
            f"rac: `compress` with prune {json.dumps(res['rac_prune'])}, sequential: layer, scale = max|w| / "
            f"{7.5 if res['rac_prune'].get('grid', 'qmax') == 'full' else 7} rounded to bf16, taken per group "
            f"{_rac_scale_time(res['rac_prune'])}. "
            f"llm-compressor: {json.dumps(peer)}; its observer fixes every group's scale from the original weights "
            f"before the sweep (max|w| / 7.5).")


def _rac_scale_time(prune: dict[str, Any]) -> str:
    """When rac's run took its scales (`scales` given flat or under quant; the default is the sweep)."""
    scales = prune.get("scales", prune.get("quant", {}).get("scales"))
    if scales == "static":
        return "from the original weights before the sweep"
    return "from the current (updated) weights when the sweep reaches it"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", default=None, help="the run whose rac calibration set and dense eval CoTs are used")
    p.add_argument("--work-dir", type=Path, default=ROOT / "work" / "results-gptq")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loss-seqs", type=int, default=12, help="held-out sequences of the per-linear loss token set")
    p.add_argument("--nll-seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--score-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the scoring forwards and error matmuls (bfloat16 is 4x faster here)")
    p.add_argument("--score-only", action="store_true",
                   help="no compression: score the folders of the last run again (its timing rows from runs.json)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true", help="rewrite peer-gptq.md from peer-gptq.json and exit")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
