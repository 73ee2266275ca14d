"""Per-layer sparsity allocation inside the compress stage: OWL's outlier ratios on the dense model.

With `prune.allocation.kind: owl` (`rac.pruners.owl`), `prepare_allocation` runs, before the first layer is
pruned, a diag-only pre-pass of the *dense* model over the calibration set in use: decoder layer by layer,
the dense layer is forwarded over every batch (its outputs feed the next dense layer, in activation stores of
their own beside the engine's), and a pre-hook on each group's first selected linear accumulates
diag(XᵀX)_j = sum_t w_t x_tj² with the same segment weights w_t (and masks) as the engine's Hessians, so a
RAC calibration (decode-weighted) and a prompt-only one give different allocations. No Hessian is formed.
Each layer's outlier ratio D_l = `outlier_ratio` over its selected linears (dense weights from the shards)
gives the sparsities `owl_sparsities(D, target, lam)`; layers with no selected linear get none.

The result is written to `<work_dir>/engine/allocation.json` (wiped with the engine folder on a fresh start).
A resumed run reads it back instead of measuring again, after checking it was made for the same target and
OWL settings; the engine fingerprint (model, calibration, config hash) is checked by the engine itself. The
engine prunes layer l with `layer_prune(cfg, allocation, l)` (the target replaced by S_l) and records the
allocation in `rac_provenance.json` and in `CompressResult.allocation`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from rac.data.segments import SEGMENT_IDS
from rac.engine.actstore import ActStore
from rac.engine.batches import Calibration
from rac.engine.checkpoint import Checkpoints
from rac.engine.compress_config import CompressConfig
from rac.engine.layer import LayerKwargs, SegmentPlan, layer_forward, read_batch
from rac.models.adapters import Adapter, decoder_layers, get_submodule
from rac.models.moe import materialize_layer
from rac.models.streaming import WeightFiles, release
from rac.pruners.base import PruneConfig
from rac.pruners.owl import outlier_ratio, owl_sparsities
from rac.store.artifacts import atomic_write_text

ALLOCATION_FILE = "allocation.json"
FORMAT = "rac.allocation.v1"


@dataclass(frozen=True)
class LayerAllocation:
    """One decoder layer's outlier ratio D_l and the sparsity S_l its linears are pruned to."""

    layer: int
    ratio: float
    sparsity: float


@dataclass(frozen=True)
class Allocation:
    """The measured allocation: settings, target (the mean of the sparsities) and per-layer values."""

    kind: str
    M: float
    lam: float
    target: float
    layers: tuple[LayerAllocation, ...]
    seconds: float  # the dense pre-pass

    def sparsity_of(self, layer: int) -> float:
        """S_l of `layer`; ValueError for a layer that has no selected linear (nothing to prune there)."""
        for la in self.layers:
            if la.layer == layer:
                return la.sparsity
        raise ValueError(f"layer {layer} has no allocated sparsity; allocated layers: {[a.layer for a in self.layers]}")

    def to_json(self) -> dict[str, Any]:
        mean = math.fsum(la.sparsity for la in self.layers) / len(self.layers) if self.layers else 0.0
        return {"format": FORMAT, "kind": self.kind, "M": self.M, "lam": self.lam, "target": self.target,
                "mean_sparsity": mean, "seconds": self.seconds, "layers": [asdict(la) for la in self.layers]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Allocation:
        if d.get("format") != FORMAT:
            raise ValueError(f"allocation record format {d.get('format')!r} is not {FORMAT!r}")
        layers = tuple(LayerAllocation(int(x["layer"]), float(x["ratio"]), float(x["sparsity"])) for x in d["layers"])
        return cls(str(d["kind"]), float(d["M"]), float(d["lam"]), float(d["target"]), layers, float(d["seconds"]))


class EngineRun(Protocol):
    """What the pre-pass reads of the engine's per-call state (`rac.engine.prune_step.PruneRun`)."""

    cfg: CompressConfig
    files: WeightFiles
    adapter: Adapter
    model: nn.Module
    calib: Calibration
    ckpt: Checkpoints
    table: list[list[tuple[str, ...]]]
    kwargs: LayerKwargs
    plan: SegmentPlan
    device: torch.device
    dtype: torch.dtype


def check_allocation(prune: PruneConfig, moe: bool, distributed: bool) -> None:
    """ValueError for engine set-ups the allocation does not support yet (before anything is written)."""
    kind = prune.allocation.kind
    if kind != "uniform" and moe:
        raise ValueError(f"allocation kind {kind!r} is not supported for mixture-of-experts models yet: use uniform")
    if kind != "uniform" and distributed:
        raise ValueError(f"allocation kind {kind!r} is not supported in data-parallel compression yet: run it "
                         "in one process")


def layer_prune(prune: PruneConfig, allocation: Allocation | None, layer: int) -> PruneConfig:
    """The pruner config for `layer`: `prune` itself (uniform), or with its sparsity set to S_l."""
    if allocation is None:
        return prune
    return prune.model_copy(update={"sparsity": allocation.sparsity_of(layer)})


def token_weights(plan: SegmentPlan, segments: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """w_t per token: the plan's segment weight, 0 for padding and for dropped segments # [B, L] float32."""
    w = torch.zeros(segments.shape, dtype=torch.float32, device=segments.device)
    for name, weight in plan.weights.items():
        w[segments == SEGMENT_IDS[name]] = weight
    return w * pad


def _diag_hook(acc: torch.Tensor, weights: list[torch.Tensor]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()  # [B, L, d_in]
        w = weights[0]  # [B, L]
        if tuple(x.shape[:-1]) != tuple(w.shape):
            raise ValueError(f"linear input {tuple(x.shape)} does not match the batch tokens {tuple(w.shape)}")
        acc.add_(torch.einsum("bld,bl->d", x * x, w))

    return hook


def dense_diags(run: EngineRun, module: nn.Module, layer: int, members: Sequence[str], src: ActStore,
                dst: ActStore | None) -> list[torch.Tensor]:
    """diag(XᵀX) # [d_in] float32 of the input of each of `members` (one linear per group), over the whole
    calibration set with the plan's token weights; the dense layer's outputs go to `dst` (if given)."""
    linears = [cast(nn.Linear, get_submodule(module, m)) for m in members]
    accs = [torch.zeros(int(lin.in_features), dtype=torch.float32, device=run.device) for lin in linears]
    current: list[torch.Tensor] = [torch.zeros(0)]
    handles = [lin.register_forward_pre_hook(_diag_hook(a, current)) for lin, a in zip(linears, accs, strict=True)]
    try:
        with torch.no_grad():
            for batch in run.calib.batches:
                hidden = read_batch(src, batch, run.dtype, run.device)  # [B, L, hidden]
                pad = batch.mask().to(run.device)
                current[0] = token_weights(run.plan, run.calib.batch_segments(batch).to(run.device), pad)
                y = layer_forward(module, hidden, run.kwargs(layer, len(batch.rows), batch.seq_len))
                if dst is not None:
                    dst.write(batch.start, y[pad])  # [n_tokens, hidden], the next dense layer's input
    finally:
        for h in handles:
            h.remove()
    return accs


def measure_owl(run: EngineRun) -> Allocation:
    """The dense pre-pass (module doc): per-layer outlier ratios, then OWL sparsities around the target."""
    t0 = time.perf_counter()
    spec = run.cfg.prune.allocation
    layers = decoder_layers(run.model, run.adapter)
    src = ActStore.open(run.ckpt.acts_path(0))  # the embeddings' output, written by the engine
    ratios: dict[int, float] = {}
    for layer, module in enumerate(layers):
        materialize_layer(module, run.adapter.layer_prefix(layer), run.files, run.adapter.moe, run.dtype, run.device)
        groups = [g for g in run.table[layer] if g]
        dst = None
        if layer + 1 < len(layers):
            dst = ActStore.create(run.ckpt.acts_root / f"owl-acts-{layer + 1:05d}.bin", run.calib.n_tokens,
                                  src.spec.hidden, run.cfg.act_dtype)
        diags = dense_diags(run, module, layer, [g[0] for g in groups], src, dst)
        release(module)
        if groups:
            prefix = run.adapter.layer_prefix(layer)
            keys = [f"{prefix}{rel}.weight" for g in groups for rel in g]
            dense = run.files.load(keys)
            weights = [dense[k].to(run.device) for k in keys]
            per_weight = [d for g, d in zip(groups, diags, strict=True) for _ in g]
            ratios[layer] = outlier_ratio(weights, per_weight, spec.M)
            del dense, weights
        if layer > 0:
            src.delete()  # a pre-pass store; the engine's acts-00000 stays for the pruning pass
        if dst is not None:
            dst.commit()
            src = dst
    if not ratios:
        raise ValueError("allocation kind 'owl': no decoder layer has a selected linear (check include/exclude)")
    target = run.cfg.prune.target_sparsity
    sparsities = owl_sparsities(list(ratios.values()), target, spec.lam)
    rows = tuple(LayerAllocation(k, ratios[k], s) for k, s in zip(ratios, sparsities, strict=True))
    return Allocation(spec.kind, spec.M, spec.lam, target, rows, time.perf_counter() - t0)


def prepare_allocation(run: EngineRun, fresh: bool) -> Allocation | None:
    """None for uniform; else measure (fresh start, after the embeddings' store is written) and persist, or
    read back the persisted allocation of the run being resumed."""
    spec = run.cfg.prune.allocation
    if spec.kind == "uniform":
        return None
    path = run.ckpt.root / ALLOCATION_FILE
    if fresh:
        alloc = measure_owl(run)
        atomic_write_text(path, json.dumps(alloc.to_json(), indent=1))
        return alloc
    if not path.is_file():
        raise ValueError(f"cannot resume: the OWL allocation of the checkpointed run is missing ({path})")
    alloc = Allocation.from_json(json.loads(path.read_text()))
    want = (spec.kind, spec.M, spec.lam, run.cfg.prune.target_sparsity)
    if (alloc.kind, alloc.M, alloc.lam, alloc.target) != want:
        raise ValueError(f"cannot resume: {path} holds (kind, M, lam, target) = "
                         f"{(alloc.kind, alloc.M, alloc.lam, alloc.target)}, the run asks for {want}")
    return alloc
