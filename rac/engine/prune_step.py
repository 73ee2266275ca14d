"""One step's pruning in `rac.engine.sequential`: the state a `compress` call shares across layers (`PruneRun`)
and the linears of one group through the solver (`prune_group` -> `prune_linear` -> `rac.pruners.prune`).

A group's plain linears share its Hessian H = sum_s w_s H_s (`SegmentPlan.hessian`), each selected expert of a
MoE layer gets its own (`rac.engine.experts.prune_experts`). Every linear's dense W is read again from the
shards (the module holds the pruned weights of earlier groups), pruned with H # [d_in, d_in] float32 (or diag H
# [d_in] for Wanda / magnitude), written back into the module in its compute dtype, and returned as checkpoint
tensors with a `LinearRecord` (loss, tr(W H W^T), damping and retries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from rac.engine.allocation import Allocation, layer_prune
from rac.engine.batches import Calibration
from rac.engine.checkpoint import (
    Checkpoints,
    ExpertRecord,
    LinearRecord,
    StepRecord,
    quant_checkpoint_tensors,
)
from rac.engine.compress_config import CompressConfig
from rac.engine.experts import ExpertStats, expert_members, prune_experts
from rac.engine.layer import LayerKwargs, SegmentPlan
from rac.models.adapters import Adapter, get_submodule
from rac.models.moe import set_weight as set_moe_weight
from rac.models.streaming import WeightFiles
from rac.pruners import prune
from rac.pruners.base import PruneConfig
from rac.pruners.error import reconstruction_loss
from rac.pruners.stats import HessianAccumulator
from rac.pruners.wanda import diag_energy, prune_diag

if TYPE_CHECKING:
    from rac.engine.distributed import DistContext


@dataclass
class PruneRun:
    """Everything one `compress` call shares across layers."""

    cfg: CompressConfig
    files: WeightFiles
    adapter: Adapter
    model: torch.nn.Module
    calib: Calibration
    ckpt: Checkpoints
    table: list[list[tuple[str, ...]]]
    layout: list[list[tuple[str, ...]]]  # per layer, per group: every linear present (hooked for statistics)
    kwargs: LayerKwargs
    plan: SegmentPlan
    device: torch.device
    dtype: torch.dtype
    on_step: Callable[[StepRecord], None] | None
    dist: DistContext | None = None  # data-parallel ranks (rac.engine.distributed), None: one process
    allocation: Allocation | None = None  # per-layer sparsities (rac.engine.allocation), None: uniform


def weight_energy(W: torch.Tensor, H: torch.Tensor, rows: int = 256) -> float:
    """tr(W H W^T) for W [out, in], H [in, in], in float32 (reduced in float64), `rows` rows at a time."""
    total = 0.0
    for i in range(0, W.shape[0], rows):
        Wb = W[i : i + rows].float()  # [rows, in]
        total += float(((Wb @ H) * Wb).sum(dtype=torch.float64))
    return total


def set_weight(run: PruneRun, module: torch.nn.Module, rel: str, W: torch.Tensor) -> None:
    """Copy W into the weight of linear `rel` of `module` (cast to the module's compute dtype)."""
    if run.adapter.moe is not None:  # checkpoint names: expert slices of fused parameters, renamed blocks
        set_moe_weight(module, run.adapter.moe, rel, W)
        return
    linear = cast(torch.nn.Linear, get_submodule(module, rel))
    with torch.no_grad():
        linear.weight.copy_(W.to(linear.weight.dtype))


def prune_linear(run: PruneRun, prefix: str, rel: str, H: torch.Tensor, tokens: int, module: torch.nn.Module,
                 cfg: PruneConfig) -> tuple[dict[str, torch.Tensor], LinearRecord]:
    """Prune one linear with H # [d_in, d_in] float32; update the module in place. Returns its checkpoint
    tensors (Ŵ in the storage dtype, plus codes and scales when quantized) and its record."""
    key = f"{prefix}{rel}.weight"
    W = run.files.load([key])[key].to(run.device)  # dense original values, storage dtype [out, in]
    res = prune(W, H, cfg) if H.dim() == 2 else prune_diag(W, H, cfg)  # H [in]: diagonal statistics
    W_hat = res.weight.to(W.dtype)
    loss = res.loss if res.loss is not None else reconstruction_loss(W, W_hat, H)
    energy = weight_energy(W, H) if H.dim() == 2 else diag_energy(W, H)
    set_weight(run, module, rel, W_hat)
    tensors = {key: W_hat}
    if res.quant is not None:  # codes and scales for the compressed-tensors folder
        tensors.update(quant_checkpoint_tensors(prefix + rel, res.quant))
    return tensors, LinearRecord(
        name=prefix + rel, shape=(int(W.shape[0]), int(W.shape[1])),
        sparsity=float((W_hat == 0).sum()) / W_hat.numel(),
        rel_error=loss / energy if energy > 0 else float("nan"), loss=loss, damp=float(res.damp),
        retries=len(res.retries), retry_log=tuple(f"damp={r.damp}: {r.error}" for r in res.retries),
        seconds=res.seconds, tokens=tokens,
    )


Pruned = tuple[dict[str, torch.Tensor], list[LinearRecord], list[ExpertRecord]]


def prune_group(run: PruneRun, layer: int, group: int, module: torch.nn.Module, acc: HessianAccumulator | None,
                experts: ExpertStats | None) -> Pruned:
    """Prune the selected linears of one group: the plain ones with the group's Hessian, each expert's with
    its own (`rac.engine.experts`); update the module in place."""
    prefix = run.adapter.layer_prefix(layer)
    members = expert_members(run.adapter.moe, run.table[layer][group])
    tensors: dict[str, torch.Tensor] = {}
    records: list[LinearRecord] = []
    expert_records: list[ExpertRecord] = []

    def one(rel: str, H: torch.Tensor, tokens: int, cfg: PruneConfig) -> None:
        out, record = prune_linear(run, prefix, rel, H, tokens, module, cfg)
        tensors.update(out)
        records.append(record)

    cfg = layer_prune(run.cfg.prune, run.allocation, layer)  # the layer's sparsity (OWL) or the config's
    plain = [r for r in run.table[layer][group] if not any(r in v for v in members.values())]
    if acc is not None and plain:
        H = run.plan.hessian(acc)  # [d_in, d_in] float32
        tokens = acc.tokens()
        del acc  # free the per-segment sums before the pruner's workspace is allocated
        for rel in plain:
            one(rel, H, tokens, cfg)
    if experts is not None:
        expert_records = prune_experts(experts, group, members, run.plan, run.cfg.moe, cfg, one)
    return tensors, records, expert_records


def load_done_groups(run: PruneRun, layer: int, upto: int, module: torch.nn.Module) -> None:
    """Put the checkpointed pruned weights of groups < upto of `layer` into the module."""
    prefix = run.adapter.layer_prefix(layer)
    for g in range(upto):
        for key, t in run.ckpt.load_weights(layer, g).items():
            if key.endswith(".weight"):  # codes / scales of quantized linears are for the output only
                set_weight(run, module, key[len(prefix):].removesuffix(".weight"), t)
