"""Per-expert statistics of mixture-of-experts layers, from exactly the tokens the router sends to each expert.

Routing. A sparse block calls its fused experts module as ``experts(x, top_k_index, top_k_weights)`` with
x [T, H] the block input of every token and the router's choice [T, k]. `ExpertStats` is a forward
pre-hook on that call: the routing it sees is the model's own (its router, its top-k, DeepSeek's grouped
top-k with the correction bias) on the inputs the engine propagates, i.e. with every earlier group
already pruned. Tokens are the calibration tokens the segment plan keeps (padding never counts).

Statistics. For expert e, R_e = {t : e in top_k_index[t]} (a token picks an expert at most once):
  gate / up (one group, one input):  H_e = sum_{t in R_e} x_t x_t^T                       [H, H]
  down:                              H_e = sum_{t in R_e} h_t h_t^T,  h_t = act(W_g x_t) * (W_u x_t)  [I, I]
with the expert's current gate / up (pruned already in the default group order), computed as its forward
computes it (`rac.models.moe.expert_intermediate`). Shared experts and dense MLP layers are plain linears
and see every token. Each W_e is then pruned as its own [out, in] matrix by `rac.pruners.prune`.

Weighting (`ExpertConfig.weighting`). The block returns y_t = sum_e w_te f_e(x_t), so the exact
layer-output objective of expert e's down projection is sum_t w_te^2 ||dW h_t||^2, i.e. H_e weighted by
w_te^2 ("routing": each routed token scaled by w_te). The default is "unweighted", for three reasons:
after pruning the router is recomputed on changed inputs and tokens move between experts, so an expert
should be reconstructed on its whole routed input distribution, not mostly on its confident tokens;
w^2 shrinks the effective sample of experts that are mostly a low-weight second choice (top-8 of 128:
w ~ 1/8 each), which makes their H dominated by a handful of tokens; and an unweighted H keeps "tokens"
one meaning: the count in `expert_tokens`, the provenance and the `min_expert_tokens` threshold. The
solvers are invariant to a global scale of H (damping is relative to mean diag H), so only the relative
weights of tokens matter.

Coverage and low-token experts. Per expert and segment, the real tokens routed there are counted (all
segments, whatever their weights) and recorded (`ExpertRecord`, index table `expert_tokens`, report
heatmap). An expert whose H rests on fewer than `min_expert_tokens` tokens is not pruned as if its H
were reliable: `low_tokens="magnitude"` (default) prunes it by magnitude (H only reports the loss),
`"damp"` runs the configured solver with relative damping `low_token_damp` (e.g. 1.0: lambda = mean diag H,
pulling the OBS updates toward plain magnitude pruning). An expert no token reached has H = 0 and is
always pruned by magnitude (SparseGPT would zero all its dead columns). Every such expert is recorded
with its treatment, in the step records and the provenance (`expert_provenance`).

Memory. The accumulators of all selected experts of a group are held at once (Qwen3-30B-A3B, float32,
one segment slot: 128 x 2048^2 x 4 B = 2 GiB for gate/up). `experts_per_pass` caps that: the group's
statistics pass runs once per chunk of experts and each chunk is pruned before the next is counted;
with `sequential="group"` this is exact (an expert's input does not depend on other experts' weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import field_validator
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rac.config import StageConfig
from rac.data.segments import SEGMENT_IDS, SEGMENT_NAMES
from rac.engine.checkpoint import ExpertRecord, StepRecord
from rac.engine.layer import SegmentPlan
from rac.models.adapters import MoeSpec
from rac.models.moe import expert_intermediate, expert_weight, experts_module, n_experts
from rac.pruners.base import PruneConfig
from rac.pruners.stats import HessianAccumulator

HESSIAN_METHODS = ("sparsegpt", "alps")  # solvers whose damping `low_tokens="damp"` raises


class ExpertConfig(StageConfig):
    """How the experts of mixture-of-experts layers get their Hessians and what few tokens imply."""

    weighting: Literal["unweighted", "routing"] = "unweighted"  # routing: token t scaled by its weight w_te
    min_expert_tokens: int = 128  # fewer tokens behind an expert's H -> `low_tokens` treatment
    low_tokens: Literal["magnitude", "damp"] = "magnitude"
    low_token_damp: float = 1.0  # relative damping for low_tokens="damp"
    experts_per_pass: int | None = None  # experts whose statistics are held at once (None: all)

    @field_validator("min_expert_tokens")
    @classmethod
    def _min_tokens(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"min_expert_tokens must be >= 0, got {v}")
        return v

    @field_validator("low_token_damp")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"low_token_damp must be finite and > 0, got {v}")
        return v

    @field_validator("experts_per_pass")
    @classmethod
    def _per_pass(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"experts_per_pass must be >= 1 (or null: all experts at once), got {v}")
        return v


def check_expert_config(moe: ExpertConfig, method: str, sequential: str) -> None:
    """ValueError for combinations that cannot work (called by `CompressConfig`'s validator)."""
    if moe.low_tokens == "damp" and method not in HESSIAN_METHODS:
        raise ValueError(f"moe.low_tokens='damp' needs a damped solver {list(HESSIAN_METHODS)}, not {method!r}")
    if moe.experts_per_pass is not None and sequential != "group":
        raise ValueError(f"moe.experts_per_pass={moe.experts_per_pass} needs sequential='group' "
                         f"(sequential={sequential!r} collects every group's statistics in one pass)")


def expert_members(spec: MoeSpec | None, names: Sequence[str]) -> dict[int, tuple[str, ...]]:
    """Expert index -> its linears among `names` (relative checkpoint names), in name order."""
    out: dict[int, list[str]] = {}
    for rel in names:
        parsed = spec.parse(rel) if spec is not None else None
        if parsed is not None:
            out.setdefault(parsed[0], []).append(rel)
    return {e: tuple(v) for e, v in sorted(out.items())}


def pass_members(spec: MoeSpec | None, selected: Mapping[int, Sequence[str]], present: Mapping[int, Sequence[str]],
                 chunk: frozenset[int] | None, plain: bool) -> tuple[dict[int, tuple[str, ...]],
                                                                    dict[int, dict[int, tuple[str, ...]]]]:
    """What one statistics pass collects, per group: the plain linears to hook (every one `present`, if
    `plain`) and expert -> its `selected` linears (the experts of `chunk` only, when given)."""
    hooked = {g: tuple(n for n in names if spec is None or spec.parse(n) is None) if plain else ()
              for g, names in present.items()}
    members = {g: {e: v for e, v in expert_members(spec, names).items() if chunk is None or e in chunk}
               for g, names in selected.items()}
    return hooked, {g: m for g, m in members.items() if m}


def expert_chunks(experts: Sequence[int], per_pass: int | None) -> list[frozenset[int] | None]:
    """The statistics passes of one group: None (every expert, one pass) or chunks of `per_pass` experts."""
    if per_pass is None or len(experts) <= per_pass:
        return [None]
    ids = sorted(experts)
    return [frozenset(ids[i : i + per_pass]) for i in range(0, len(ids), per_pass)]


def expert_treatment(tokens: int, moe: ExpertConfig, prune: PruneConfig) -> tuple[PruneConfig, str]:
    """The pruner config for an expert whose H rests on `tokens` tokens, and the treatment's name."""
    if tokens >= max(moe.min_expert_tokens, 1):
        return prune, "hessian"
    if moe.low_tokens == "damp" and tokens > 0:
        return prune.model_copy(update={"damp": moe.low_token_damp}), f"damp={moe.low_token_damp:g}"
    return prune.model_copy(update={"method": "magnitude"}), "magnitude"


def prune_experts(stats: ExpertStats, group: int, members: Mapping[int, Sequence[str]], plan: SegmentPlan,
                  moe: ExpertConfig, prune: PruneConfig,
                  prune_linear: Callable[[str, Tensor, int, PruneConfig], None]) -> list[ExpertRecord]:
    """Prune every expert of `group` that `stats` holds: its linears `members[e]` by `prune_linear(rel, H_e,
    tokens, cfg)` with its own H_e and the config its token count calls for; their records, by expert."""
    records = []
    for e, acc in stats.take(group).items():
        tokens = acc.tokens()
        cfg, treatment = expert_treatment(tokens, moe, prune)
        H = plan.hessian(acc)  # [d_in, d_in] float32: this expert's routed tokens only
        for rel in members[e]:
            prune_linear(rel, H, tokens, cfg)
        records.append(ExpertRecord(e, stats.segment_tokens(e), tokens, treatment))
    return records


def _bind(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) of an experts call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = [*args[:3], *(kwargs[n] for n in names[len(args[:3]):] if n in kwargs)]
    if len(values) != 3:
        raise ValueError(f"experts module called with {len(args)} args and keys {sorted(kwargs)}; expected {names}")
    return values[0], values[1], values[2]


class ExpertStats:
    """Forward pre-hook on a layer's fused experts module: one accumulator per (group, expert) over the
    expert's routed tokens, and the routed real tokens per expert and segment (`counts` [E, S])."""

    def __init__(self, layer: nn.Module, spec: MoeSpec, members: Mapping[int, Mapping[int, Sequence[str]]],
                 plan: SegmentPlan, weighting: str) -> None:
        experts = experts_module(layer, spec)
        if experts is None:
            raise ValueError(f"expert linears requested but the layer has no {spec.block}.{spec.experts}")
        self.module, self.plan, self.weighting = experts, plan, weighting
        hidden, inter = (int(n) for n in expert_weight(experts, 0, "down").shape)  # down_proj[0]: [H, I]
        self.down: dict[int, bool] = {}
        self.accs: dict[tuple[int, int], HessianAccumulator] = {}
        for g, per_expert in members.items():
            parsed = [spec.parse(rel) for names in per_expert.values() for rel in names]
            roles = {p[1] for p in parsed if p is not None}
            if "down" in roles and len(roles) > 1:
                raise ValueError(f"group {g} mixes expert down and gate/up linears: they do not share an input")
            self.down[g] = "down" in roles
            for e in per_expert:
                self.accs[(g, e)] = plan.make(inter if self.down[g] else hidden)
        self.counts = torch.zeros(n_experts(experts), len(SEGMENT_IDS), dtype=torch.int64)  # [E, S]
        self._batch: tuple[Tensor, Tensor, Tensor | None, Tensor] | None = None
        self._done: Callable[[], None] = lambda: None

    def attach(self, done: Callable[[], None]) -> RemovableHandle:
        """Register the hook; `done()` is called after each batch's statistics (it may stop the forward)."""
        self._done = done
        return self.module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def start_batch(self, segments: Tensor, pad_mask: Tensor) -> None:
        """The raw segment ids and the padding mask [B, L] of the next batch."""
        labels, keep = self.plan.labels(segments, pad_mask)
        self._batch = (segments.reshape(-1), pad_mask.reshape(-1),
                       None if labels is None else labels.reshape(-1), keep.reshape(-1))

    def segment_tokens(self, expert: int) -> dict[str, int]:
        """Real tokens routed to `expert` per segment name."""
        return {SEGMENT_NAMES[s]: int(self.counts[expert, s]) for s in range(self.counts.shape[1])}

    def take(self, group: int) -> dict[int, HessianAccumulator]:
        """Pop the accumulators of `group`, by expert."""
        keys = sorted(k for k in self.accs if k[0] == group)
        return {e: self.accs.pop((g, e)) for g, e in keys}

    def _hook(self, mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._batch is None:
            raise ValueError("ExpertStats: start_batch was not called before the forward")
        x, index, weights = _bind(args, kwargs)  # [T, H], [T, k], [T, k]
        seg, pad, labels, keep = self._batch
        if x.shape[0] != seg.numel():
            raise ValueError(f"experts got {x.shape[0]} tokens for a batch of {seg.numel()}")
        n_exp, n_seg = self.counts.shape
        real = pad[:, None] & (index < n_exp)  # [T, k]; index == E marks a dropped slot
        code = index[real] * n_seg + seg[:, None].expand_as(index)[real]
        self.counts += torch.bincount(code, minlength=n_exp * n_seg).view(n_exp, n_seg).cpu()
        for (g, e), acc in self.accs.items():
            hit = (index == e) & keep[:, None]  # [T, k]
            rows = hit.any(dim=-1)  # [T]
            if not bool(rows.any()):
                continue
            xe = x[rows]  # [T_e, H]
            if self.down[g]:
                xe = expert_intermediate(mod, e, xe)  # [T_e, I]
            if self.weighting == "routing":
                xe = xe.float() * (weights * hit).sum(dim=-1)[rows, None].float()
            acc.add(xe, segment_ids=None if labels is None else labels[rows])
        self._done()


def expert_provenance(steps: Sequence[StepRecord], moe: ExpertConfig) -> dict[str, Any]:
    """The provenance's `experts` section: the settings, every expert's coverage, the low-token experts."""
    rows = [{"layer": s.layer, "group": s.group, "expert": x.expert, "tokens": x.tokens,
             "segment_tokens": x.segment_tokens, "treatment": x.treatment} for s in steps for x in s.experts]
    return {"config": moe.model_dump(mode="json"), "experts": rows,
            "low_token_experts": [r for r in rows if r["treatment"] != "hessian"]}
