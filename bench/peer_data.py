"""Inputs of `bench.peer` shared by both tools, built with rac's own library stages and cached, and the one
held-out scoring function.

Calibration and held-out sets (`build_sets`): GSM8K prompts (the 100 bundled test problems, split by rac's
deterministic group hash with eval_fraction 0.25: 74 calibration-side, 26 held-out problems) in the
model's own chat template, each followed by the dense model's own sampled answer (transformers engine,
float32, the model's sampling defaults, seeded per prompt). The calibration set is rac's `kind: rac` Parquet
(prompt tokens + decode tokens, `token_budget` tokens), exported once with `rac.data.calib_export` so that
llm-compressor reads exactly the same token ids; the held-out set is every held-out prompt with its answer,
never in the calibration set. Everything is cached under bench/.cache/peer/<key>/ (key: the hash of the
settings), so each benchmark run reuses the same tokens.

`heldout_nll(model_dir, heldout)`: mean negative log-likelihood of the held-out answer tokens (the tokens
labelled decode, each predicted from the prompt and the answer before it), the model loaded by transformers
in float32; per-sequence sums are returned as well, for paired comparisons.

`solver_problem(rows, cols, tokens, seed)`: W [rows, cols] and H = X^T X of `tokens` correlated tokens
(low-rank mix plus noise, log-normal column scales; the construction of `bench.solvers.synthetic_layer`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from rac.data.calib import CalibConfig, build_calibration
from rac.data.calib_export import export_calibration, summary_json
from rac.data.generate import GenerateConfig, generate_cots
from rac.data.prompts import PromptsConfig, sample_prompts
from rac.data.segments import SEGMENT_IDS

CACHE = Path(__file__).resolve().parent / ".cache" / "peer"
EVAL_FRACTION = 0.25


@dataclass(frozen=True)
class SetsSpec:
    """How many calibration prompts / tokens, the answer cap, and the seed."""

    calib_prompts: int = 64
    calib_tokens: int = 16384
    heldout_prompts: int | None = None  # None: every held-out problem
    max_new_tokens: int = 256
    seed: int = 0

    def key(self, model_dir: Path) -> str:
        text = json.dumps({**self.__dict__, "model": str(model_dir), "eval_fraction": EVAL_FRACTION, "v": 1},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Sets:
    """Paths of the cached inputs and what they hold."""

    root: Path
    calib: Path  # rac calibration Parquet
    calib_export: Path  # the same set as a `datasets` folder (llm-compressor reads this)
    heldout: Path  # held-out prompts + answers, a calibration Parquet of kind rac
    info: dict[str, Any]


def _prompts_and_answers(model_dir: Path, root: Path, name: str, holdout: str, n: int | None,
                         spec: SetsSpec) -> Path:
    """prompts.parquet of split `holdout` plus the dense model's answers (a cots folder); returns the folder."""
    prompts = root / f"{name}-prompts.parquet"
    if not prompts.exists():
        sample_prompts(PromptsConfig(source="gsm8k", holdout=holdout,  # type: ignore[arg-type]
                                     eval_fraction=EVAL_FRACTION, n=n, seed=spec.seed), model_dir, prompts)
    cots = root / f"{name}-answers"
    gen = GenerateConfig(engine="transformers", max_new_tokens=spec.max_new_tokens, token_budget=None,
                         dtype="float32", batch_size=8, shard_size=32, seed=spec.seed)
    generate_cots(prompts, model_dir, gen, cots)  # resumes: finished shards are kept
    return cots


def build_sets(model_dir: Path, spec: SetsSpec, cache: Path = CACHE) -> Sets:
    """The calibration set (Parquet + export) and the held-out set for `model_dir`, built once and cached."""
    root = cache / spec.key(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    calib, export, heldout = root / "calib.parquet", root / "calib-export", root / "heldout.parquet"
    if not calib.exists():
        cots = _prompts_and_answers(model_dir, root, "calib", "calib", spec.calib_prompts, spec)
        build_calibration(CalibConfig(kind="rac", token_budget=spec.calib_tokens, seed=spec.seed,
                                      min_decode_share=0.3), model_dir, calib, cots_dir=cots)
    if not (export / "rac_calibration.json").exists():
        summary = summary_json(export_calibration(calib, export))
        (root / "export.json").write_text(json.dumps(summary, indent=1))
    if not heldout.exists():
        cots = _prompts_and_answers(model_dir, root, "heldout", "eval", spec.heldout_prompts, spec)
        build_calibration(CalibConfig(kind="rac", token_budget=10**9, seed=spec.seed, min_decode_share=0.3),
                          model_dir, heldout, cots_dir=cots)
    _check_disjoint(calib, heldout)
    info = {"spec": spec.__dict__, "key": root.name, "calib": _describe(calib), "heldout": _describe(heldout),
            "export": json.loads((root / "export.json").read_text())}
    return Sets(root, calib, export, heldout, info)


def _describe(path: Path) -> dict[str, Any]:
    t = pq.read_table(path, columns=["input_ids", "segment"])
    segs = [np.asarray(s) for s in t.column("segment").to_pylist()]
    n = sum(len(s) for s in segs)
    return {"n_seqs": t.num_rows, "n_tokens": n,
            "decode_tokens": int(sum((s == SEGMENT_IDS["decode"]).sum() for s in segs)),
            "max_seq_len": max(len(s) for s in segs), "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_disjoint(calib: Path, heldout: Path) -> None:
    """The held-out prompts must not be calibration prompts (sources are `cot:<prompt_id>/<sample>`)."""
    def prompts(p: Path) -> set[str]:
        return {s.split(":", 1)[1].rsplit("/", 1)[0] for s in pq.read_table(p, columns=["source"])
                .column("source").to_pylist()}

    shared = prompts(calib) & prompts(heldout)
    if shared:
        raise ValueError(f"held-out prompts {sorted(shared)[:5]} are also in the calibration set")


def heldout_nll(model_dir: Path, heldout: Path) -> dict[str, Any]:
    """Mean NLL (nats/token) and perplexity of the held-out answer tokens under the model at `model_dir`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    t = pq.read_table(heldout, columns=["input_ids", "segment"])
    sums, counts = [], []
    with torch.inference_mode():
        for ids_list, seg_list in zip(t.column("input_ids").to_pylist(), t.column("segment").to_pylist(),
                                      strict=True):
            ids = torch.tensor(ids_list)[None]  # [1, L]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # [L-1, V]
            target = ids[0, 1:]  # [L-1]
            scored = torch.tensor(seg_list[1:]) == SEGMENT_IDS["decode"]  # answer tokens, [L-1]
            nll = -logp.gather(1, target[:, None])[:, 0]  # [L-1]
            sums.append(float(nll[scored].sum(dtype=torch.float64)))
            counts.append(int(scored.sum()))
    total, n = sum(sums), sum(counts)
    return {"nll": total / n, "ppl": math.exp(total / n), "tokens": n, "seqs": len(sums),
            "seq_nll_sums": sums, "seq_tokens": counts}


def paired_nll_interval(a: dict[str, Any], b: dict[str, Any], n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
    """NLL(a) - NLL(b) on the same held-out sequences and its 95% bootstrap interval (sequences resampled)."""
    sa, sb = np.asarray(a["seq_nll_sums"]), np.asarray(b["seq_nll_sums"])
    n = np.asarray(a["seq_tokens"], dtype=np.float64)
    if sa.shape != sb.shape or not np.array_equal(n, np.asarray(b["seq_tokens"])):
        raise ValueError("paired NLL needs both models scored on the same held-out sequences")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(n_boot, len(n)))
    diffs = (sa[idx].sum(1) - sb[idx].sum(1)) / n[idx].sum(1)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return float((sa.sum() - sb.sum()) / n.sum()), float(lo), float(hi)


def solver_problem(rows: int, cols: int, tokens: int = 8192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, cols] and H = X^T X [cols, cols] of `tokens` correlated tokens (float32, seeded)."""
    g = torch.Generator().manual_seed(seed)
    rank = max(8, cols // 8)
    Z = torch.randn(tokens, rank, generator=g) @ (torch.randn(rank, cols, generator=g) / math.sqrt(rank))
    X = (Z + 0.3 * torch.randn(tokens, cols, generator=g)) * torch.exp(0.5 * torch.randn(cols, generator=g))
    W = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    return W, X.T @ X
