"""Mixture-of-experts layers: where the experts live in a checkpoint and in the transformers module.

transformers 5 keeps the experts of a sparse block as fused 3-D parameters (`Qwen3MoeExperts`,
`MixtralExperts`, `DeepseekV3Experts`):
  gate_up_proj [E, 2I, H]   rows [0, I) are expert e's gate projection, rows [I, 2I) its up projection
  down_proj    [E, H, I]
while checkpoints keep one 2-D matrix per expert linear, which `save_pretrained` writes back and
`from_pretrained` fuses through the conversion mapping (`MergeModulelist(dim=0)` + `Concatenate(dim=1)`):
  <block>.experts.<e>.gate_proj.weight [I, H]   (Mixtral: block_sparse_moe.experts.<e>.w1)
  <block>.experts.<e>.up_proj.weight   [I, H]   (w3)
  <block>.experts.<e>.down_proj.weight [H, I]   (w2)
rac works in the checkpoint's names: an expert linear is `mlp.experts.3.gate_proj` (relative to its
decoder layer) in the step records, globs, the index and the output folder, which therefore keeps the
source's per-expert layout and reloads with transformers' own conversion. `materialize_layer` fuses the
checkpoint matrices into a layer's parameters, `set_weight` writes one expert's [out, in] slice back.

Adapter groups name expert linears by templates with ``{e}`` (``mlp.experts.{e}.gate_proj``);
`layer_candidates` expands them per layer over the experts present in the weight files and drops the
names a layer lacks (dense MLP layers of a MoE model, no shared experts, no q LoRA ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import cast

import torch
from torch import nn

from rac.models.adapters import EXPERT, Adapter, MoeSpec, Role
from rac.models.streaming import ShardError, WeightFiles, materialize


def experts_module(layer: nn.Module, spec: MoeSpec) -> nn.Module | None:
    """The fused experts module of a decoder layer, None for a dense layer."""
    try:
        mod = layer.get_submodule(f"{spec.block}.{spec.experts}")
    except AttributeError:
        return None
    return mod if isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor) else None


def n_experts(experts: nn.Module) -> int:
    """E of a fused experts module."""
    return int(cast(torch.Tensor, experts.gate_up_proj).shape[0])


def expert_weight(experts: nn.Module, expert: int, role: Role) -> torch.Tensor:
    """View of expert `expert`'s `role` matrix inside the fused parameters # [out, in]."""
    gate_up = cast(torch.Tensor, experts.gate_up_proj)  # [E, 2I, H]
    inter = gate_up.shape[1] // 2
    if role == "gate":
        return gate_up[expert, :inter]  # [I, H]
    if role == "up":
        return gate_up[expert, inter:]  # [I, H]
    return cast(torch.Tensor, experts.down_proj)[expert]  # [H, I]


def expert_intermediate(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """act(x W_gate^T) * (x W_up^T) of one expert, as its forward computes it # x [T, H] -> [T, I]."""
    gate, up = nn.functional.linear(x, cast(torch.Tensor, experts.gate_up_proj)[expert]).chunk(2, dim=-1)
    act = cast(Callable[[torch.Tensor], torch.Tensor], experts.act_fn)
    return act(gate) * up


def set_weight(layer: nn.Module, spec: MoeSpec, rel: str, W: torch.Tensor) -> None:
    """Copy W # [out, in] into the linear `rel` (checkpoint name) of a decoder layer, expert slices included."""
    parsed = spec.parse(rel)
    with torch.no_grad():
        if parsed is None:
            target = cast(torch.Tensor, layer.get_submodule(spec.module_path(rel)).weight)
        else:
            experts = experts_module(layer, spec)
            if experts is None:
                raise ValueError(f"{rel!r} names an expert linear but the layer has no {spec.block}.{spec.experts}")
            target = expert_weight(experts, *parsed)
        if tuple(target.shape) != tuple(W.shape):
            raise ValueError(f"{rel}: weight of shape {tuple(W.shape)} for a {tuple(target.shape)} matrix")
        target.copy_(W.to(target.dtype))


def layer_candidates(adapter: Adapter, n_layers: int, weight_names: Collection[str]) -> list[list[tuple[str, ...]]]:
    """Per layer, per adapter group: the linears the weight files hold (templates expanded over experts)."""
    if adapter.moe is None:
        raise ValueError(f"adapter {adapter.family!r} has no mixture-of-experts spec")
    spec, present = adapter.moe, set(weight_names)
    pattern = re.compile(rf"{re.escape(spec.file_block)}\.{re.escape(spec.experts)}\.(\d+)\.")
    out: list[list[tuple[str, ...]]] = []
    for layer in range(n_layers):
        prefix = adapter.layer_prefix(layer)
        ids = sorted({int(m.group(1)) for n in present if n.startswith(prefix)
                      and (m := pattern.match(n, len(prefix))) is not None})
        per_group = []
        for group in adapter.groups:
            plain, templates = [t for t in group if EXPERT not in t], [t for t in group if EXPERT in t]
            names = plain + [t.replace(EXPERT, str(e)) for e in ids for t in templates]  # expert by expert
            per_group.append(tuple(n for n in names if f"{prefix}{n}.weight" in present))
        out.append(per_group)
    return out


def _fused(spec: MoeSpec, tensors: dict[str, torch.Tensor], experts: nn.Module, where: str, dtype: torch.dtype,
           device: torch.device | str) -> dict[str, torch.Tensor]:
    """The fused experts parameters (`dtype` on `device`) from the per-expert checkpoint matrices, popped
    from `tensors` one by one: the peak is one layer's checkpoint experts plus the fused copy."""
    count = n_experts(experts)
    missing = [spec.expert_name(e, r) for e in range(count) for r in ("gate", "up", "down")
               if spec.expert_name(e, r) + ".weight" not in tensors]
    if missing:
        fused = f"{spec.file_block}.{spec.experts}.gate_up_proj"
        hint = " (the file holds fused experts: not supported, rac reads per-expert checkpoints)" \
            if fused in tensors else ""
        raise ShardError(f"{where}: expert tensors {missing[:3]} not found{hint}")
    inter, hidden = tensors[spec.expert_name(0, "gate") + ".weight"].shape
    gate_up = torch.empty(count, 2 * inter, hidden, dtype=dtype, device=device)  # [E, 2I, H]
    down = torch.empty(count, hidden, inter, dtype=dtype, device=device)  # [E, H, I]
    for e in range(count):
        gate_up[e, :inter] = tensors.pop(spec.expert_name(e, "gate") + ".weight")
        gate_up[e, inter:] = tensors.pop(spec.expert_name(e, "up") + ".weight")
        down[e] = tensors.pop(spec.expert_name(e, "down") + ".weight")
    key = f"{spec.block}.{spec.experts}."
    return {key + "gate_up_proj": gate_up, key + "down_proj": down}


def materialize_layer(layer: nn.Module, prefix: str, files: WeightFiles, spec: MoeSpec | None, dtype: torch.dtype,
                      device: torch.device | str) -> None:
    """`rac.models.streaming.materialize` for a decoder layer (`spec` None: exactly that). Of a MoE model:
    per-expert checkpoint matrices fused into the experts parameters, block names mapped
    (`block_sparse_moe.` -> `mlp.`); buffers the model keeps in float32 (DeepSeek's
    `e_score_correction_bias`) keep their checkpoint dtype."""
    if spec is None:
        materialize(layer, prefix, files, dtype, device)
        return
    tensors = files.load_prefix(prefix)
    experts = experts_module(layer, spec)
    where = f"{files.model_dir}: {prefix}"
    state = _fused(spec, tensors, experts, where, dtype, device) if experts is not None else {}
    state.update({spec.module_path(k): v for k, v in tensors.items()})
    wanted = set(layer.state_dict().keys())
    missing = sorted(wanted - set(state))
    if missing:
        raise ShardError(f"{files.model_dir}: tensors {[prefix + m for m in missing[:5]]} not found")
    keep = {k for k in wanted if k.endswith("e_score_correction_bias")}
    cast_state = {k: v.to(device=device, dtype=v.dtype if k in keep else dtype) for k, v in state.items()
                  if k in wanted}
    layer.load_state_dict(cast_state, strict=True, assign=True)
