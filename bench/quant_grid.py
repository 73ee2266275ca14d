"""Quantization grid benchmark: layer loss of RTN and GPTQ (damp 0.01) under the "qmax" grid (s = max|w| / q_max,
7 at 4 bits) and the "full" grid (s = max|w| / (q_max + 1/2), 7.5 at 4 bits, compressed-tensors'), on the solver
level. 4-bit g128 with GPTQ's scales taken in the sweep or fixed from the original weights ("static",
llm-compressor's setting) and with act order "weight"; 8-bit g128 and per channel; the joint sparse + 4-bit mode
(SparseGPT 2:4 and 50 % with quant).

    python -m bench.quant_grid [--layers 2,12,21] [--threads 1] [--model-dir DIR] [--no-real] [--report-only]

Problems:
* real: every linear of the decoder layers `--layers` of Qwen2.5-Coder-0.5B (the converted copy in
  ~/.cache/rac/models), W its weight, H = sum_t x_t x_t^T of its inputs in the dense model's float32 forward over
  4096 calibration tokens; a second H over 2048 held-out tokens scores the same Ŵ out of sample. Tokens: rac's
  own Python sources and docs at commit TEXT_COMMIT (shuffled files, one token stream cut into 512-token
  sequences, every third held out), so the inputs are fixed text, not random.
* synthetic: W Student-t (df 3 and df 5, heavy-tailed like LLM weights) and Gaussian, H = X^T X of 4096
  correlated tokens (low-rank mix + noise, log-normal channel scales, 1% of the channels 10x larger).
Loss: tr(ΔW H ΔW^T) / tr(W H W^T) in float64. Writes bench/results/quant-grid.json and quant-grid.md; the
H matrices are cached in bench/.cache/quant-grid/ (never committed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.solvers import machine, write_atomic
from rac.pruners import PruneConfig, QuantSpec, prune, rtn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache" / "quant-grid"
MODEL_DIR = Path.home() / ".cache" / "rac" / "models" / "qwen2.5-coder-0.5b-instruct-v1"
TEXT_COMMIT = "aa34601"  # rac's sources at this commit are the calibration text
SEQ, CALIB_SEQS, HELDOUT_SEQS = 512, 8, 4  # 4096 calibration tokens, 2048 held out
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Variant:
    """One solver setting; its "qmax" / "full" twin has the other word in `name` and the other grid."""

    name: str
    method: str  # "rtn", "gptq" or "sparsegpt" (the joint sparse + quantized mode)
    quant: dict[str, Any]  # QuantSpec fields besides the grid
    grid: str
    prune: dict[str, Any] = field(default_factory=dict)  # PruneConfig fields besides method / quant / damp


def _pair(name: str, method: str, quant: dict[str, Any], prune: dict[str, Any] | None = None) -> list[Variant]:
    return [Variant(f"{name} {g}", method, quant, g, prune or {}) for g in ("qmax", "full")]


W4, W8 = {"bits": 4, "group_size": 128}, {"bits": 8, "group_size": 128}
VARIANTS: tuple[Variant, ...] = (
    *_pair("rtn", "rtn", W4), *_pair("gptq sweep", "gptq", {**W4, "scales": "sweep"}),
    *_pair("gptq static", "gptq", {**W4, "scales": "static"}),
    *_pair("gptq act-order weight", "gptq", {**W4, "act_order": "weight"}),
    *_pair("w8g128 rtn", "rtn", W8), *_pair("w8g128 gptq", "gptq", W8),
    *_pair("w8ch gptq", "gptq", {"bits": 8, "group_size": None}),
    *_pair("2:4 + w4g128", "sparsegpt", W4, {"nm": (2, 4)}), *_pair("50% + w4g128", "sparsegpt", W4, {"sparsity": 0.5}),
)
BASE = "gptq sweep qmax"  # rac's default before the option
W4_GPTQ = ("gptq sweep", "gptq static", "gptq act-order weight")  # the rows compared with BASE


def text_tokens(tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    """(calibration, held-out) token sequences of SEQ tokens from rac's sources at TEXT_COMMIT."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", TEXT_COMMIT], check=True,
                           capture_output=True, text=True).stdout.split()
    files = sorted(n for n in names if (n.startswith("rac/") and n.endswith(".py")) or
                   (n.startswith("docs/") and n.endswith(".md")))
    random.Random(0).shuffle(files)
    stream: list[int] = []
    n_seqs = CALIB_SEQS + HELDOUT_SEQS
    for name in files:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{TEXT_COMMIT}:{name}"], check=True,
                              capture_output=True, text=True).stdout
        stream += tokenizer(f"# {name}\n{text}")["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= SEQ * n_seqs:
            break
    seqs = [stream[i * SEQ : (i + 1) * SEQ] for i in range(n_seqs)]
    return [s for i, s in enumerate(seqs) if i % 3 != 2], [s for i, s in enumerate(seqs) if i % 3 == 2]


def real_problems(model_dir: Path, layers: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: {"W", "H", "H_heldout"}} for the chosen layers (H cached on disk)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = CACHE / f"qwen-{'-'.join(map(str, layers))}.pt"
    if cache.is_file():
        return torch.load(cache)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calib, heldout = text_tokens(tok)
    out: dict[str, dict[str, torch.Tensor]] = {}
    split = {"key": "H"}
    hooks = []
    for layer in layers:
        for lin in LINEARS:
            name = f"model.layers.{layer}.{lin}"
            mod = model.get_submodule(name)
            d = mod.weight.shape[1]
            out[name] = {"W": mod.weight.detach().clone(), "H": torch.zeros(d, d, dtype=torch.float64),
                         "H_heldout": torch.zeros(d, d, dtype=torch.float64)}

            def hook(_m: Any, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
                out[name][split["key"]].add_(x.T @ x)

            hooks.append(mod.register_forward_pre_hook(hook))
    last = max(layers)
    stop = model.get_submodule(f"model.layers.{last}").register_forward_hook(lambda *_: _raise_stop())
    with torch.no_grad():
        for key, seqs in (("H", calib), ("H_heldout", heldout)):
            split["key"] = key
            for s in seqs:
                try:
                    model(torch.tensor([s]))
                except _Stop:
                    pass
    for h in [*hooks, stop]:
        h.remove()
    CACHE.mkdir(parents=True, exist_ok=True)
    problems = {k: {"W": v["W"], "H": v["H"].float(), "H_heldout": v["H_heldout"].float()} for k, v in out.items()}
    torch.save(problems, cache)
    return problems


class _Stop(Exception):
    """Raised after the last chosen layer: the rest of the forward is not needed."""


def _raise_stop() -> None:
    raise _Stop


def synthetic_problem(rows: int, cols: int, weights: str, seed: int, tokens: int = 4096) -> dict[str, torch.Tensor]:
    """W [rows, cols] (Student-t with df given as "t3" / "t5", or "gauss") and H = X^T X of correlated tokens."""
    g = torch.Generator().manual_seed(seed)
    rank = max(8, cols // 8)
    Z = torch.randn(tokens, rank, generator=g) @ (torch.randn(rank, cols, generator=g) / math.sqrt(rank))
    scale = torch.exp(0.5 * torch.randn(cols, generator=g))
    scale[torch.randperm(cols, generator=g)[: max(1, cols // 100)]] *= 10.0  # outlier channels
    X = (Z + 0.3 * torch.randn(tokens, cols, generator=g)) * scale  # [tokens, cols]
    if weights == "gauss":
        W = torch.randn(rows, cols, generator=g)
    else:
        df = float(weights.removeprefix("t"))
        chi2 = torch.distributions.Chi2(torch.tensor(df)).sample((rows, cols))  # torch's global generator
        W = torch.randn(rows, cols, generator=g) / torch.sqrt(chi2 / df)
    return {"W": W / math.sqrt(cols), "H": X.T @ X}


def rel_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔW^T) / tr(W H W^T) in float64."""
    D, Wd, Hd = (W.double() - W_hat.double()), W.double(), H.double()
    return float(((D @ Hd) * D).sum() / ((Wd @ Hd) * Wd).sum())


def run_problem(p: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{variant: {"loss", "loss_heldout" (real only), "min_code_share", "seconds"}} of one layer, and under
    "_layer" its max diag H / mean diag H."""
    res: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        spec = QuantSpec.model_validate({**v.quant, "grid": v.grid})
        name = v.name
        t0 = time.perf_counter()
        if v.method == "rtn":
            qw = rtn(p["W"], spec)
        else:
            out = prune(p["W"], p["H"], PruneConfig(method=v.method, quant=spec, damp=0.01, **v.prune))
            assert out.quant is not None
            qw = out.quant
        W_hat = qw.dequantize()
        rec = {"loss": rel_loss(p["W"], W_hat, p["H"]), "seconds": time.perf_counter() - t0,
               "min_code_share": float((qw.q == -spec.q_max - 1).float().mean())}
        if "H_heldout" in p:
            rec["loss_heldout"] = rel_loss(p["W"], W_hat, p["H_heldout"])
        res[name] = rec
    diag = p["H"].diagonal().double()
    res["_layer"] = {"peak_energy": float(diag.max() / diag.mean())}  # max diag H / mean diag H
    return res


def summarize(records: dict[str, dict[str, dict[str, float]]], key: str) -> dict[str, dict[str, Any]]:
    """Per variant: mean loss, geometric mean of loss / BASE's (4-bit GPTQ rows); for "full" rows also full /
    qmax at the same method (geometric mean, median, max, on how many layers full is lower)."""
    out: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        name = v.name
        loss = np.array([r[name][key] for r in records.values()])
        row: dict[str, Any] = {"mean": float(loss.mean()), "n": len(loss),
                               "min_code_share": float(np.mean([r[name]["min_code_share"] for r in records.values()]))}
        if name.rsplit(" ", 1)[0] in W4_GPTQ:
            base = np.array([r[BASE][key] for r in records.values()])
            row["geomean_vs_base"] = float(np.exp(np.log(loss / base).mean()))
        if v.grid == "full":
            ratio = loss / np.array([r[name.replace("full", "qmax")][key] for r in records.values()])
            row.update(full_vs_qmax_geomean=float(np.exp(np.log(ratio).mean())),
                       full_vs_qmax_median=float(np.median(ratio)), full_vs_qmax_max=float(ratio.max()),
                       full_lower=int((ratio < 1).sum()))
        out[name] = row
    return out


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["# Quantization grid: qmax (max|w| / q_max) vs full (max|w| / (q_max + 1/2)), RTN and GPTQ", "",
             f"Command: `{m['command']}` ({m['date']}, {res['seconds']:.0f} s). Machine: {m['cpu']}, {m['cores']} "
             f"cores shared with other jobs (load average {m['loadavg_at_start'][0]:.1f} at start), torch "
             f"{m['torch']}, {res['threads']} thread(s). Every solver: damp 0.01, blocksize 128, no act order "
             "unless named; "
             "scales `sweep` (taken from the current weights when the sweep reaches a group, rac's default) or "
             "`static` (from the original weights before the sweep, llm-compressor's); rows that name neither "
             "sweep (RTN is static by nature; act order \"weight\" is static: the original column groups, scales "
             "from the original weights). `w4g128` unless named; `2:4 + w4g128` / `50% + w4g128` = SparseGPT's "
             "joint sparse + quantized sweep (50 %: per block over all rows). Scales in bf16, codes clamp to "
             "[-2^(b-1), 2^(b-1) - 1] on both grids (q_max = 7 at 4 bits, 127 at 8). Loss = tr(ΔW H ΔW^T) / "
             "tr(W H W^T) (float64). "
             "`/ base` = geometric mean over the layers of loss / loss of gptq sweep qmax (rac's default before "
             "the option); `full / qmax` (full rows) = loss on the full grid / loss on the qmax grid with the same "
             "method, per layer: geometric mean, median and max; `full lower` = on how many layers the full grid "
             "is below; `lowest code` = share of the weights with code -2^(b-1) (-8 at 4 bits).", ""]
    for group, info in res["summary"].items():
        lines += [f"## {group}", "", info["what"], "",
                  "| variant | mean loss | / base (geomean) | full / qmax geomean | median | max | full lower | "
                  "lowest code |", "|---|---|---|---|---|---|---|---|"]
        for name, s in info["table"].items():
            vs = (f"{s['full_vs_qmax_geomean']:.4f} | {s['full_vs_qmax_median']:.4f} | {s['full_vs_qmax_max']:.3f} | "
                  f"{s['full_lower']} / {s['n']}") if "full_lower" in s else " | | | "
            vb = f"{s['geomean_vs_base']:.4f}" if "geomean_vs_base" in s else ""
            lines.append(f"| {name} | {s['mean']:.4g} | {vb} | {vs} | {s['min_code_share']:.4f} |")
        lines.append("")
    worse = [f"{layer} ({v.name}: {r[v.name]['loss'] / r[v.name.replace('full', 'qmax')]['loss']:.2f}x, peak "
             f"{r['_layer']['peak_energy']:.0f})" for layer, r in res["records"].items() for v in VARIANTS
             if v.grid == "full" and r[v.name]["loss"] > 1.1 * r[v.name.replace("full", "qmax")]["loss"]]
    lines += ["## Where the full grid loses by more than 10 %", "",
              "Layer (variant: loss full / qmax, peak = max diag H / mean diag H): " + ("; ".join(worse) or "none")
              + ".", ""]
    lines += ["## Per layer (loss; real layers: calibration H / held-out H)", "",
              "`peak` = max diag H / mean diag H: the energy of the layer's strongest input channel.", "",
              "| layer | peak | " + " | ".join(v.name for v in VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for layer, r in res["records"].items():
        cells = [f"{r[v.name]['loss']:.4g}" + (f" / {r[v.name]['loss_heldout']:.4g}" if "loss_heldout" in r[v.name]
                                                  else "") for v in VARIANTS]
        lines.append(f"| {layer} | {r['_layer']['peak_energy']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,12,21")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    p.add_argument("--no-real", action="store_true", help="synthetic problems only")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true", help="rewrite quant-grid.md from quant-grid.json")
    a = p.parse_args()
    if a.report_only:
        write_atomic(a.out / "quant-grid.md", to_markdown(json.loads((a.out / "quant-grid.json").read_text())))
        return
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)  # the Chi2 draws of the Student-t weights
    meta = machine()
    meta["command"] = " ".join(["python -m bench.quant_grid", *sys.argv[1:]])
    start = time.perf_counter()
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    what: dict[str, str] = {}
    if not a.no_real:
        layers = [int(v) for v in a.layers.split(",")]
        groups["real"] = real_problems(a.model_dir, layers)
        what["real"] = (f"Qwen2.5-Coder-0.5B, every linear of decoder layers {layers} ({len(groups['real'])} "
                        "linears); H from 4096 tokens of rac's own sources (see the module docstring).")
    shapes = [(896, 896), (896, 4864), (4864, 896)]
    for weights in ("t3", "t5", "gauss"):
        groups[f"synthetic {weights}"] = {f"{weights} {r}x{c} s{seed}": synthetic_problem(r, c, weights, seed)
                                          for r, c in shapes for seed in range(2)}
        what[f"synthetic {weights}"] = (f"W {'Gaussian' if weights == 'gauss' else 'Student-t df ' + weights[1:]}, "
                                        f"shapes {shapes} x 2 seeds, H of 4096 correlated tokens.")
    records: dict[str, dict[str, dict[str, float]]] = {}
    summary: dict[str, Any] = {}
    for group, probs in groups.items():
        recs = {}
        for name, prob in probs.items():
            recs[name] = run_problem(prob)
            losses = ", ".join(f"{k} {v['loss']:.4g}" for k, v in recs[name].items() if k != "_layer")
            print(f"[quant-grid] {name}: {losses}", flush=True)
        records.update(recs)
        summary[group] = {"what": what[group], "table": summarize(recs, "loss")}
        if group == "real":
            summary["real, held-out H"] = {"what": "The same Ŵ scored on the 2048 held-out tokens' H.",
                                           "table": summarize(recs, "loss_heldout")}
    meta["loadavg_at_end"] = list(os.getloadavg())
    res = {"machine": meta, "threads": a.threads, "seconds": time.perf_counter() - start, "summary": summary,
           "records": records}
    a.out.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out / "quant-grid.json", json.dumps(res, indent=1) + "\n")
    write_atomic(a.out / "quant-grid.md", to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
