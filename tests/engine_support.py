"""Helpers for the engine tests: calibration files and an independent in-memory reference engine.

The reference holds the whole model in memory, runs each calibration sequence through the full model with
forward hooks on the linears (one accumulator per linear), and calls the same pruner function. It shares
no code with the streamed engine besides `rac.pruners.stats`, `rac.pruners` and the calibration file format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

from rac.data.segments import CALIB_SCHEMA
from rac.pruners import PruneConfig, prune
from rac.pruners.error import relative_error
from rac.pruners.stats import HessianAccumulator

GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
Seq = tuple[list[int], list[int]]  # (input_ids, segment labels)


def random_sequences(n: int, vocab: int, lengths: Sequence[int], seed: int = 0) -> list[Seq]:
    """`n` random sequences with lengths drawn from `lengths`: first half prompt (0), rest decode (1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.choice(list(lengths)))
        ids = rng.integers(0, vocab, length).tolist()
        cut = max(1, length // 3)
        out.append((ids, [0] * cut + [1] * (length - cut)))
    return out


def folder_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a written HF folder (through its safetensors index)."""
    import json

    from safetensors import safe_open

    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(out_dir / fname), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors


def write_calib(path: Path, seqs: Sequence[Seq]) -> Path:
    """A calibration Parquet in `CALIB_SCHEMA` from (ids, segments) pairs."""
    rows = [{"seq_id": i, "source": "test", "input_ids": ids, "segment": seg} for i, (ids, seg) in enumerate(seqs)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CALIB_SCHEMA), str(path))
    return path


def _collect(model: torch.nn.Module, names: list[str], seqs: Sequence[Seq],
             segments: tuple[str, ...]) -> dict[str, HessianAccumulator]:
    """One accumulator per named linear, from full-model forwards of every sequence on its own."""
    mods = dict(model.named_modules())
    accs = {n: HessianAccumulator(mods[n].in_features, segments=segments) for n in names}
    current: dict[str, torch.Tensor] = {}

    def make(name: str):  # type: ignore[no-untyped-def]
        def hook(mod, args, out):  # type: ignore[no-untyped-def]
            accs[name].add(args[0], segment_ids=current["seg"])
        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in names]
    with torch.no_grad():
        for ids, seg in seqs:
            current["seg"] = torch.tensor([seg])
            model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    return accs


def reference_prune(model_dir: Path, seqs: Sequence[Seq], prune_cfg: PruneConfig, sequential: str,
                    weights: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Pruned weights {"model.layers.i.x.weight": W} of every decoder linear (float32), and their
    `rac.pruners.error.relative_error` under the reference H."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = {0: "prompt", 1: "decode", 2: "other"}
    segments = tuple(names[s] for s in sorted({x for _, seg in seqs for x in seg}))
    w = {k: v for k, v in weights.items() if k in segments}
    mods = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for layer in range(model.config.num_hidden_layers):
        full = [[f"model.layers.{layer}.{r}" for r in g] for g in GROUPS]
        accs = _collect(model, [n for g in full for n in g], seqs, segments) if sequential == "layer" else {}
        for group in full:
            if sequential == "group":
                accs = _collect(model, group, seqs, segments)
            for name in group:
                lin = mods[name]
                H = accs[name].hessian(w)
                res = prune(lin.weight.data.clone(), H, prune_cfg)
                errors[name + ".weight"] = relative_error(lin.weight.data, res.weight, H)
                lin.weight.data.copy_(res.weight)
                out[name + ".weight"] = res.weight.clone()
    return out, errors
