"""Passes of one decoder layer over the whole calibration set, reading from / writing to activation stores.

- `embed_pass`: runs the model's own prologue on the calibration ids and stores the hidden states that enter
  decoder layer 0 (captured by `capture_layer_call`, so embedding scaling etc. are the model's own).
- `stats_pass`: forwards the layer over every batch with pre-hooks on the linears of the requested groups and
  accumulates one Hessian per group (the members of a group share their input: checked, not assumed). The
  forward stops as soon as the last requested group has seen its input.
- `output_pass`: forwards the (pruned) layer and stores its outputs, the next layer's inputs.
Both passes take an optional `ReplayPass` (`rac.engine.replay`): finished sub-blocks return their recorded
outputs instead of being recomputed.
The keyword arguments of every layer call come from `LayerKwargs`, which captures them from the model
skeleton for the batch shape (position embeddings, masks...), exactly as the model's forward builds them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from rac.data.segments import SEGMENT_IDS
from rac.engine.actstore import ActStore
from rac.engine.batches import Batch, Calibration
from rac.engine.replay import ReplayPass
from rac.models.adapters import Adapter, capture_layer_call, get_submodule
from rac.pruners.stats import DiagAccumulator, HessianAccumulator


def _tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in a (nested tuple/list/dict of) kwargs value."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


class LayerKwargs:
    """Keyword arguments decoder layer `i` is called with for a [B, L] batch, captured from the skeleton.

    Captures of the current layer are cached (every pass over the calibration reuses them) within
    `budget_bytes`; moving to another layer clears the cache.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, hidden: int, dtype: torch.dtype,
                 device: torch.device, budget_bytes: int = 256 * 1024**2) -> None:
        self.model, self.adapter, self.hidden = model, adapter, hidden
        self.dtype, self.device, self.budget_bytes = dtype, device, budget_bytes
        self._cache: OrderedDict[tuple[int, int], tuple[dict[str, Any], int]] = OrderedDict()
        self._layer = -1
        self.captures = 0

    def __call__(self, layer: int, batch_size: int, seq_len: int) -> dict[str, Any]:
        if layer != self._layer:
            self._cache.clear()
            self._layer = layer
        key = (batch_size, seq_len)
        if key in self._cache:
            return self._cache[key][0]
        zeros = torch.zeros(batch_size, seq_len, self.hidden, dtype=self.dtype, device=self.device)
        _, kwargs = capture_layer_call(self.model, self.adapter, layer, inputs_embeds=zeros, use_cache=False)
        self.captures += 1
        size = _tensor_bytes(kwargs)
        self._cache[key] = (kwargs, size)
        while sum(n for _, n in self._cache.values()) > self.budget_bytes and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return kwargs


def layer_forward(module: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """Output hidden states of a decoder layer call # [B, L, hidden] (tuple outputs unwrapped)."""
    out = module(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def read_batch(store: ActStore, batch: Batch, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A batch's stored hidden states, right-padded with zeros # [B, L, hidden]."""
    rows = store.read(batch.start, batch.n_tokens).to(device=device, dtype=dtype)  # [n_tokens, hidden]
    if len(set(batch.lengths)) == 1:
        return rows.view(len(batch.rows), batch.seq_len, -1)
    out = rows.new_zeros(len(batch.rows), batch.seq_len, rows.shape[1])
    out[batch.mask().to(device)] = rows
    return out


def _write_batch(store: ActStore, batch: Batch, y: torch.Tensor) -> None:
    """Store the real (unpadded) tokens of a batch output y # [B, L, hidden]."""
    store.write(batch.start, y[batch.mask().to(y.device)])  # [n_tokens, hidden], sequence-major


def embed_pass(model: nn.Module, adapter: Adapter, calib: Calibration, out: ActStore,
               device: torch.device) -> None:
    """Store the hidden states entering decoder layer 0 for every calibration token (embeddings loaded)."""
    for batch in calib.batches:
        ids = calib.batch_ids(batch).to(device)  # [B, L]
        hidden, _ = capture_layer_call(model, adapter, 0, input_ids=ids, use_cache=False)
        _write_batch(out, batch, hidden)


def output_pass(module: nn.Module, layer: int, calib: Calibration, src: ActStore, dst: ActStore,
                kwargs: LayerKwargs, dtype: torch.dtype, device: torch.device,
                replay: ReplayPass | None = None) -> None:
    """Forward the layer over every batch of `src` and write its outputs to `dst`."""
    with torch.no_grad(), replay or nullcontext():
        for i, batch in enumerate(calib.batches):
            hidden = read_batch(src, batch, dtype, device)
            if replay is not None:
                replay.start_batch(i, device)
            y = layer_forward(module, hidden, kwargs(layer, len(batch.rows), batch.seq_len))
            _write_batch(dst, batch, y)


@dataclass(frozen=True)
class SegmentPlan:
    """Which calibration tokens feed the Hessians, and how H = sum_s w_s H_s is formed.

    Tokens of segments with weight 0 are masked out. When every kept segment has the same weight w, one
    accumulator slot takes them all (H = w * sum over kept tokens: the same matrix with a third of the
    memory); otherwise each kept segment gets its own slot.
    """

    weights: dict[str, float]  # kept (weight > 0) segments present in the calibration
    device: torch.device
    diag: bool = False  # accumulate only diag H (DiagAccumulator: Wanda, magnitude)

    @classmethod
    def build(cls, segment_weights: Mapping[str, float], present: Sequence[str],
              device: torch.device, diag: bool = False) -> SegmentPlan:
        kept = {s: float(segment_weights.get(s, 0.0)) for s in present if segment_weights.get(s, 0.0) > 0}
        if not kept:
            raise ValueError(f"segment_weights {dict(segment_weights)} give weight 0 to every segment "
                             f"present in the calibration {list(present)}")
        return cls(kept, device, diag)

    @property
    def merged(self) -> bool:
        return len(set(self.weights.values())) == 1

    def make(self, n_features: int) -> HessianAccumulator:
        """An empty accumulator for an input of `n_features` (of diag H only, with `diag`)."""
        slots = ("other",) if self.merged else tuple(self.weights)
        kind = DiagAccumulator if self.diag else HessianAccumulator
        return kind(n_features, segments=slots, device=self.device)

    def hessian(self, acc: HessianAccumulator) -> torch.Tensor:
        """H = sum_s w_s H_s # [d, d] float32 ([d], its diagonal, from a DiagAccumulator). Consumes `acc`: with
        one slot, H is its buffer scaled in place."""
        if self.merged:
            H = acc.state()["hessians"][0]  # [d, d] (or [d]), no copy: a 70B down_proj H is 3.3 GB
            weight = next(iter(self.weights.values()))
            return H.mul_(weight) if weight != 1.0 else H
        return acc.hessian(self.weights)

    def labels(self, segments: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(segment ids or None when merged, token mask) for a batch # [B, L] each."""
        keep = torch.zeros_like(pad_mask)
        for name in self.weights:
            keep |= segments == SEGMENT_IDS[name]
        return (None if self.merged else segments), keep & pad_mask


class _Stop(Exception):
    """Raised by a statistics hook once every requested group has seen its input."""


class RoutedHooks(Protocol):
    """Statistics of a MoE layer's routed experts (`rac.engine.experts.ExpertStats`), counted as one more
    member of the pass: `done()` after each batch's experts call."""

    def attach(self, done: Callable[[], None]) -> Any: ...

    def start_batch(self, segments: torch.Tensor, pad_mask: torch.Tensor) -> None: ...


class _GroupHooks:
    """Pre-hooks on the linears of the requested groups: one Hessian per group, stop after the last."""

    def __init__(self, module: nn.Module, groups: Mapping[int, Sequence[str]], plan: SegmentPlan,
                 routed: RoutedHooks | None = None) -> None:
        groups = {g: names for g, names in groups.items() if names}  # a MoE group may hold only experts
        self.routed = routed
        self.linears = {g: [get_submodule(module, n) for n in names] for g, names in groups.items()}
        for g, mods in self.linears.items():
            if not all(isinstance(m, nn.Linear) for m in mods):
                raise ValueError(f"group {g} members {list(groups[g])} are not all nn.Linear")
        self.names = {g: list(names) for g, names in groups.items()}
        self.accs = {g: plan.make(int(cast(nn.Linear, mods[0]).in_features)) for g, mods in self.linears.items()}
        self.segments: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[torch.Tensor, int]] = {}
        self._pending = 0
        self._handles: list[Any] = []

    def __enter__(self) -> _GroupHooks:
        for g, mods in self.linears.items():
            for m in mods:
                self._handles.append(m.register_forward_pre_hook(self._hook(g)))
        if self.routed is not None:
            self._handles.append(self.routed.attach(self._arrived))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def start_batch(self, segments: torch.Tensor | None, mask: torch.Tensor) -> None:
        self.segments, self.mask, self._seen = segments, mask, {}
        self._pending = sum(len(m) for m in self.linears.values()) + (self.routed is not None)

    def _arrived(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            raise _Stop

    def _hook(self, g: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]  # [B, L, d_in] (MLA's latent kv_b_proj input: [B, 1, L, d_in])
            if g not in self._seen:
                tokens = x.squeeze(1) if self.mask is not None and x.dim() == self.mask.dim() + 2 else x
                self.accs[g].add(tokens, segment_ids=self.segments, token_mask=self.mask)
                self._seen[g] = (x, 1)
            else:
                first, count = self._seen[g]
                if x is not first:
                    raise ValueError(f"linears {self.names[g]} of one group do not share their input")
                self._seen[g] = (first, count + 1)
            self._arrived()

        return hook


def stats_pass(module: nn.Module, layer: int, groups: Mapping[int, Sequence[str]], calib: Calibration,
               src: ActStore, kwargs: LayerKwargs, dtype: torch.dtype, device: torch.device,
               plan: SegmentPlan, routed: RoutedHooks | None = None,
               replay: ReplayPass | None = None) -> dict[int, HessianAccumulator]:
    """One Hessian accumulator per requested group over the calibration tokens the plan keeps (and, with
    `routed`, the per-expert statistics of a MoE layer in the same forward)."""
    hooks = _GroupHooks(module, groups, plan, routed)
    with hooks, torch.no_grad(), replay or nullcontext():  # replay's recorders run before the hooks' _Stop
        for i, batch in enumerate(calib.batches):
            hidden = read_batch(src, batch, dtype, device)
            segments, pad = calib.batch_segments(batch).to(device), batch.mask().to(device)
            hooks.start_batch(*plan.labels(segments, pad))
            if routed is not None:
                routed.start_batch(segments, pad)
            if replay is not None:
                replay.start_batch(i, device)
            try:
                layer_forward(module, hidden, kwargs(layer, len(batch.rows), batch.seq_len))
            except _Stop:
                continue
            raise ValueError(f"layer {layer}: linears of groups {sorted(groups)} were not all called")
    return hooks.accs
