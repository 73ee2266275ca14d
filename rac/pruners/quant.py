"""Symmetric integer weight quantization: the grid, round-to-nearest, and the quantized-weight record.

Grid. A weight row is split into groups of `group_size` consecutive input columns (or one group per row,
"per channel", when `group_size` is None). Each group g of row i has one scale
s_ig = max_j |w_ij| / q_max with q_max = 2^(b-1) - 1 (7 for 4 bits, 127 for 8 bits), and the codes are
q_ij = clamp(round(w_ij / s_ig), -q_max - 1, q_max), so ŵ_ij = s_ig q_ij. An all-zero group gets s = 1
(its codes are 0). Scales are rounded to `scale_dtype` (bf16 by default) when they are chosen, because the
served folder stores them in that 16-bit dtype: codes are then chosen against the scale that is served, and
Ŵ = q * scale is exactly what transformers and vLLM compute from the folder. This is compressed-tensors' symmetric `int` scheme (zero point 0, `group` or
`channel` strategy), which vLLM serves as W4A16 / W8A16.

Activation order (`act_order`, GPTQ only) visits the columns in decreasing diag H; it decides how the groups
relate to that order. YAML `act_order: true` means "weight", the one vLLM serves:
* "weight" (static groups; compressed-tensors `actorder: "weight"`, llm-compressor's ActivationOrdering.WEIGHT,
  GPTQ's `static_groups=True`): the groups stay the contiguous column blocks j // group_size of the original
  order and their scales are fixed from the original weights before the sweep. The folder is the same as without
  act order (no g_idx): `g_idx` is None.
* "group" (dynamic groups; `actorder: "group"` with `weight_g_idx`): groups of group_size consecutive columns
  in processing order, scales taken when the sweep reaches them; `g_idx[j]` names the group of input column j
  in the original column order, so ŵ_ij = s_{i, g_idx[j]} q_ij. transformers loads such a folder; vLLM 0.32
  refuses it on every platform. Needs groups (compressed-tensors has no group act order per channel).
Per channel there is one group a row whatever the order (its scale always comes from the original weights), so
only "weight" applies and g_idx is None. Without act order column j belongs to group j // group_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import field_validator, model_validator
from torch import Tensor

from rac.config import StageConfig

GROUP_SIZES = (32, 64, 128)
ActOrder = Literal[False, "weight", "group"]
ACT_ORDERS: tuple[ActOrder, ...] = (False, "weight", "group")


class QuantSpec(StageConfig):
    """How weights are quantized: bits, group size (None = per output channel), activation order."""

    bits: Literal[4, 8] = 4
    group_size: int | None = 128
    act_order: ActOrder = False  # GPTQ: columns in decreasing diag H; true = "weight" (see the module docstring)
    scale_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # the dtype the folder stores scales in

    @field_validator("act_order", mode="before")
    @classmethod
    def _act_order(cls, v: object) -> object:
        if v is True:
            return "weight"  # the servable mode
        if v is False or (isinstance(v, str) and v in ACT_ORDERS):
            return v
        raise ValueError(f"act_order must be false, true (= 'weight'), 'weight' (static groups, served by vLLM) "
                         f"or 'group' (g_idx; transformers only), got {v!r}")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        if v is not None and v not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} or null (per channel), got {v}")
        return v

    @model_validator(mode="after")
    def _group_order_needs_groups(self) -> QuantSpec:
        if self.act_order == "group" and self.group_size is None:
            raise ValueError("act_order='group' needs a group_size (per channel has one group a row: "
                             "use act_order='weight', the same result)")
        return self

    @property
    def has_g_idx(self) -> bool:
        """Whether the groups follow the processing order (act_order "group"): the record carries g_idx."""
        return self.act_order == "group"

    @property
    def static_groups(self) -> bool:
        """Whether every group's scales are fixed from the original weights before the sweep (per channel, or
        act_order "weight"), rather than taken from the current weights when the sweep reaches the group."""
        return self.group_size is None or self.act_order == "weight"

    @property
    def q_max(self) -> int:
        """Largest code: 2^(bits-1) - 1."""
        return 2 ** (self.bits - 1) - 1

    @property
    def label(self) -> str:
        """Short name, e.g. ``w4g128`` or ``w8ch`` (per channel); ``a`` appended with act order "weight",
        ``ag`` with act order "group"."""
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{group}" + {False: "", "weight": "a", "group": "ag"}[self.act_order]

    def group_width(self, in_features: int) -> int:
        """Columns per group for a weight with `in_features` inputs (all of them per channel)."""
        if self.group_size is None:
            return in_features
        if in_features % self.group_size != 0:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={self.group_size}")
        return self.group_size


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes and scales of one linear: Ŵ = q * scale[:, g_idx] (see module docstring)."""

    q: Tensor  # [out, in] int8 codes in [-q_max - 1, q_max]
    scale: Tensor  # [out, n_groups] float32
    g_idx: Tensor | None  # [in] int32 group of each input column (act order "group"); None = column // group width
    spec: QuantSpec

    def groups(self) -> Tensor:
        """[in] int64 group index of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        cols, n_groups = self.q.shape[1], self.scale.shape[1]
        return torch.arange(cols, device=self.q.device) // (cols // n_groups)

    def dequantize(self) -> Tensor:
        """Ŵ [out, in] float32."""
        return self.q.float() * self.scale[:, self.groups()]


def group_scales(W: Tensor, spec: QuantSpec) -> Tensor:
    """Scales [rows, 1] of the columns W [rows, c] taken as one group each row: max |w| / q_max rounded to
    `spec.scale_dtype` (1 if all 0), as float32."""
    amax = W.abs().amax(dim=1, keepdim=True)  # [rows, 1]
    dtype = torch.bfloat16 if spec.scale_dtype == "bfloat16" else torch.float16
    scale = (amax / spec.q_max).clamp_min(torch.finfo(dtype).tiny).to(dtype).float()  # representable in dtype
    return torch.where(amax > 0, scale, torch.ones_like(amax))


def quantize_codes(W: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """Codes clamp(round(W / scale), -q_max - 1, q_max) as float32 (W [rows, c], scale broadcastable)."""
    return torch.clamp(torch.round(W / scale), -spec.q_max - 1, spec.q_max)


def rtn(W: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of W [out, in] on the grid (the baseline GPTQ must beat)."""
    Wf = W.detach().float()
    width = spec.group_width(Wf.shape[1])
    out, cols = Wf.shape
    tiles = Wf.reshape(out * (cols // width), width)  # [out * n_groups, width]
    scale = group_scales(tiles, spec)  # [out * n_groups, 1]
    q = quantize_codes(tiles, scale, spec).reshape(out, cols)
    return QuantizedWeight(q=q.to(torch.int8), scale=scale.reshape(out, cols // width), g_idx=None, spec=spec)
