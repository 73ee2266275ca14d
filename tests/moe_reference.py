"""An in-memory reference for the mixture-of-experts engine tests, written for them.

The whole model is loaded by transformers (`from_pretrained`: its own checkpoint conversion fuses the
per-expert matrices); every calibration sequence runs through the full model on its own. Plain linears
(attention, shared experts, dense MLPs) get forward hooks; each sparse block gets a forward hook that
reads the router's output of that forward (a hook on the router module: the model's own top-k) and adds,
for every expert e, the block inputs of exactly the tokens whose top-k holds e (gate/up) or their
intermediate act(x W_g^T) * (x W_u^T) computed from the reference's own copy of the expert matrices
(down). Every matrix is pruned by the same `rac.pruners.prune`; pruned experts are written into the fused
parameters by the reference's own indexing. Shares with the engine only `rac.pruners` and the stats class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rac.pruners import PruneConfig, prune
from rac.pruners.stats import HessianAccumulator

Seq = tuple[list[int], list[int]]
ATTN = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
MLA = [["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"], ["self_attn.q_b_proj"], ["self_attn.kv_b_proj"],
       ["self_attn.o_proj"]]
# per arch: attention groups (module names), the checkpoint names of an expert's (gate, up, down)
ARCHS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"attn": ATTN, "expert": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj",
                                           "mlp.experts.{e}.down_proj")},
    "mixtral": {"attn": ATTN, "expert": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                                         "block_sparse_moe.experts.{e}.w2")},
    "deepseek_v3": {"attn": MLA, "expert": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj",
                                            "mlp.experts.{e}.down_proj")},
}


def _file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k).float() for k in fh.keys()})  # noqa: SIM118
    return out


class _Layer:
    """One decoder layer of the in-memory model: its groups as (plain module names, expert roles)."""

    def __init__(self, model: Any, arch: str, layer: int, files: dict[str, torch.Tensor]) -> None:
        self.prefix = f"model.layers.{layer}."
        self.module = model.model.layers[layer]
        self.block = self.module.mlp
        self.moe = hasattr(self.block, "experts")
        self.names = ARCHS[arch]["expert"]
        plain_in = ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"] if hasattr(
            self.block, "shared_experts") else []
        plain_out = ["mlp.shared_experts.down_proj"] if plain_in else []
        if not self.moe:
            plain_in, plain_out = ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]
        attn = [[n for n in g if n in dict(self.module.named_modules())] for g in ARCHS[arch]["attn"]]
        self.groups: list[tuple[list[str], str | None]] = [(g, None) for g in attn if g]
        self.groups += [(plain_in, "in" if self.moe else None), (plain_out, "down" if self.moe else None)]
        self.n_experts = int(self.block.experts.gate_up_proj.shape[0]) if self.moe else 0
        self.mats = {self.name(e, r): files[self.prefix + self.name(e, r) + ".weight"].clone()
                     for e in range(self.n_experts) for r in range(3)}  # checkpoint matrices [out, in]

    def name(self, expert: int, role: int) -> str:
        return self.names[role].format(e=expert)

    def write_expert(self, expert: int) -> None:
        """The reference's own fused layout: gate_up[e] = [gate; up], down[e] = down."""
        with torch.no_grad():
            gate_up = torch.cat([self.mats[self.name(expert, 0)], self.mats[self.name(expert, 1)]])
            self.block.experts.gate_up_proj[expert].copy_(gate_up)
            self.block.experts.down_proj[expert].copy_(self.mats[self.name(expert, 2)])


def _collect(model: Any, layer: _Layer, groups: Sequence[tuple[list[str], str | None]], seqs: Sequence[Seq],
             segments: tuple[str, ...], weighting: str) -> dict[str, HessianAccumulator]:
    """Accumulators per plain linear name and per expert key ('in:3', 'down:3'), from full-model forwards."""
    mods = dict(layer.module.named_modules())
    accs: dict[str, HessianAccumulator] = {}
    current: dict[str, Any] = {}
    handles = []
    for names, kind in groups:
        for n in names:
            accs[n] = HessianAccumulator(mods[n].in_features, segments=segments)
            handles.append(mods[n].register_forward_hook(
                lambda m, a, o, n=n: accs[n].add(a[0].reshape(-1, a[0].shape[-1]), segment_ids=current["seg"])))
        if kind is not None:
            for e in range(layer.n_experts):
                d = layer.mats[layer.name(e, 2 if kind == "down" else 0)].shape[1]
                accs[f"{kind}:{e}"] = HessianAccumulator(d, segments=segments)
    kinds = [k for _, k in groups if k is not None]
    if kinds:
        handles.append(layer.block.gate.register_forward_hook(lambda m, a, o: current.update(route=o)))

        def block_hook(mod: Any, args: Any, out: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # [L, H]
            _, weights, index = current["route"]  # [L, k]
            for e in range(layer.n_experts):
                rows = (index == e).any(dim=-1)
                w = (weights * (index == e)).sum(dim=-1)[rows]
                for kind in kinds:
                    xe = x[rows]
                    if kind == "down":
                        g, u = layer.mats[layer.name(e, 0)], layer.mats[layer.name(e, 1)]
                        xe = mod.experts.act_fn(xe @ g.T) * (xe @ u.T)
                    if weighting == "routing":
                        xe = xe * w[:, None]
                    accs[f"{kind}:{e}"].add(xe, segment_ids=current["seg"][rows])

        handles.append(layer.block.register_forward_hook(block_hook))
    with torch.no_grad():
        for ids, seg in seqs:
            current["seg"] = torch.tensor(seg)
            model(input_ids=torch.tensor([ids]), use_cache=False)
    for h in handles:
        h.remove()
    return accs


def reference_prune_moe(model_dir: Path, arch: str, seqs: Sequence[Seq], cfg: PruneConfig, sequential: str,
                        weights: dict[str, float], weighting: str = "unweighted") -> dict[str, torch.Tensor]:
    """Pruned matrices by checkpoint name ("model.layers.1.mlp.experts.3.gate_proj.weight": W, float32)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    files = _file_tensors(Path(model_dir))
    seg_names = {0: "prompt", 1: "decode", 2: "other"}
    segments = tuple(seg_names[s] for s in sorted({x for _, seg in seqs for x in seg}))
    w = {k: v for k, v in weights.items() if k in segments}
    out: dict[str, torch.Tensor] = {}
    for i in range(model.config.num_hidden_layers):
        layer = _Layer(model, arch, i, files)
        mods = dict(layer.module.named_modules())
        accs = _collect(model, layer, layer.groups, seqs, segments, weighting) if sequential == "layer" else {}
        for names, kind in layer.groups:
            if sequential == "group":
                accs = _collect(model, layer, [(names, kind)], seqs, segments, weighting)
            for n in names:
                res = prune(mods[n].weight.data.clone(), accs[n].hessian(w), cfg)
                mods[n].weight.data.copy_(res.weight)
                out[layer.prefix + n + ".weight"] = res.weight.clone()
            for e in range(layer.n_experts) if kind is not None else ():
                H = accs[f"{kind}:{e}"].hessian(w)
                for role in ((2,) if kind == "down" else (0, 1)):
                    name = layer.name(e, role)
                    layer.mats[name] = prune(layer.mats[name], H, cfg).weight.clone()
                    out[layer.prefix + name + ".weight"] = layer.mats[name]
                layer.write_expert(e)
    return out
