"""Symmetric integer weight quantization: the grid, round-to-nearest, and the quantized-weight record.

Grid. A weight row is split into groups of `group_size` consecutive input columns (or one group per row,
"per channel", when `group_size` is None). Each group g of row i has one scale s_ig, and the codes are
q_ij = clamp(round(w_ij / s_ig), -q_max - 1, q_max) with q_max = 2^(b-1) - 1 (7 for 4 bits, 127 for 8 bits),
so ŵ_ij = s_ig q_ij. Two scale rules (`grid`), with a_ig = max_j |w_ij| over the group:
* "qmax": s_ig = a_ig / q_max (a_ig / 7 at 4 bits). The group's largest |w| is exact (up to the 16-bit
  rounding of s) and RTN leaves code -q_max - 1 unused (at 8 bits the rounding of s can reach it): 2^b - 1
  of the 2^b levels.
* "full": s_ig = a_ig / (q_max + 1/2) (a_ig / 7.5 at 4 bits, a_ig / 127.5 at 8 bits): the whole
  [-q_max - 1, q_max] range with a step (q_max + 1/2) / q_max times finer; a largest weight +a_ig lands on
  q_max + 1/2 and is clipped to q_max (half a step off), -a_ig is code -q_max - 1. This is the scale of
  compressed-tensors' symmetric observers (`memoryless_minmax`, which llm-compressor's GPTQModifier uses):
  `compressed_tensors.quantization.utils.helpers.calculate_qparams` (0.17) sets
  scale = max(|min|, |max|) / ((bit_max - bit_min) / 2) with (bit_min, bit_max) = (-2^(b-1), 2^(b-1) - 1)
  from `calculate_range`, i.e. a_ig / ((2^b - 1) / 2) = a_ig / (q_max + 1/2).
Default "full", measured on the layer loss tr(ΔW H ΔW^T) / tr(W H W^T) (bench/results/quant-grid.md: 21
linears of Qwen2.5-Coder-0.5B with H from 4096 tokens, and heavy-tailed synthetic layers): 4-bit g128 GPTQ
(scales taken in the sweep) 0.91x the loss of "qmax", lower on 21 of 21 real linears, also on a held-out H;
with act order "weight" 0.93x (20 of 21); joint 2:4 / 50 % + 4-bit 0.99x / 0.98x; RTN 0.89-0.91x on the
synthetic layers. It is also what llm-compressor writes. At 8 bits the two are within 1 % (g128 0.996x on the
real linears, 1.007-1.010x on synthetic ones: the clipped largest weight costs about what the 0.4 % finer
step gains). Where "full" loses: layers with a few input channels of ~550x the mean energy (down_proj of
layers 2 and 21, massive activations) when the scales are static (RTN 6.7x / 1.7x, `scales: static` 42x /
1.7x, act order "weight" 1.9x on layer 21): the clipped largest weight, or weights that the updates push out
of a range fixed beforehand, sit on the strongest input; with scales taken in the sweep "full" is lower
there too. The canonical form always names the grid, so every quantized config's hash changed with this
option and no stage cached under the old max|w| / q_max grid is reused under either grid.
An all-zero group gets s = 1 (its codes are 0). Scales are rounded to `scale_dtype` (bf16 by default) when
they are chosen, because the served folder stores them in that 16-bit dtype: codes are then chosen against
the scale that is served, and Ŵ = q * scale is exactly what transformers and vLLM compute from the folder.
This is compressed-tensors' symmetric `int` scheme (zero point 0, `group` or `channel` strategy), which vLLM
serves as W4A16 / W8A16.

When the scales are taken (`scales`, GPTQ and the joint mode): "sweep" takes a group's scales from its
current weights (after the error updates of the earlier columns) when the sweep reaches the group, GPTQ's
reference `static_groups=False`; "static" fixes every group's scales from the original weights before the
sweep, as llm-compressor's GPTQ always does (its observer runs on the unquantized weight). None (the default,
left out of the canonical form) is the act order's own rule: static with act order "weight" and per channel,
sweep otherwise. Per channel the two coincide (the one group is reached before any update). RTN has only
original weights, so it is static. Measured (same benchmark, 4-bit g128, no act order): "static" is 0.98x
the loss of "sweep" on most layers (median 0.98x on "qmax", 0.99x on "full"; 0.98x on the synthetic ones),
but on "full" it is 45x / 1.8x the loss of "sweep" on the two massive-activation down_proj layers above. So
"sweep" stays the default without act order: "full" + "sweep" (rac's default) is far below llm-compressor's
"full" + "static" on those layers and about 1 % above it elsewhere.

Activation order (`act_order`, GPTQ only) visits the columns in decreasing diag H; it decides how the groups
relate to that order. YAML `act_order: true` means "weight", the one vLLM serves:
* "weight" (static groups; compressed-tensors `actorder: "weight"`, llm-compressor's ActivationOrdering.WEIGHT,
  GPTQ's `static_groups=True`): the groups stay the contiguous column blocks j // group_size of the original
  order and their scales are fixed from the original weights before the sweep. The folder is the same as without
  act order (no g_idx): `g_idx` is None.
* "group" (dynamic groups; `actorder: "group"` with `weight_g_idx`): groups of group_size consecutive columns
  in processing order, scales taken when the sweep reaches them (`scales: static`: from the original weights
  of those columns before the sweep, llm-compressor's ActivationOrdering.GROUP); `g_idx[j]` names the group of input column j
  in the original column order, so ŵ_ij = s_{i, g_idx[j]} q_ij. transformers loads such a folder; vLLM 0.32
  refuses it on every platform. Needs groups (compressed-tensors has no group act order per channel).
Per channel there is one group a row whatever the order (its scale always comes from the original weights), so
only "weight" applies and g_idx is None. Without act order column j belongs to group j // group_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from rac.config import StageConfig

GROUP_SIZES = (32, 64, 128)
ActOrder = Literal[False, "weight", "group"]
ACT_ORDERS: tuple[ActOrder, ...] = (False, "weight", "group")
QuantGrid = Literal["qmax", "full"]
GRIDS: tuple[QuantGrid, ...] = ("qmax", "full")
DEFAULT_GRID: QuantGrid = "full"
ScaleTime = Literal["sweep", "static"]
SCALE_TIMES: tuple[ScaleTime, ...] = ("sweep", "static")


class QuantSpec(StageConfig):
    """How weights are quantized: bits, group size (None = per output channel), activation order."""

    bits: Literal[4, 8] = 4
    group_size: int | None = 128
    act_order: ActOrder = False  # GPTQ: columns in decreasing diag H; true = "weight" (see the module docstring)
    scale_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # the dtype the folder stores scales in
    # s = max|w| / q_max ("qmax") or / (q_max + 1/2) ("full", compressed-tensors'); always in canonical()
    grid: QuantGrid = DEFAULT_GRID
    # when GPTQ takes a group's scales: None = the act order's rule (left out of canonical(): hashes unchanged)
    scales: ScaleTime | None = Field(default=None, exclude_if=lambda v: v is None)

    @field_validator("act_order", mode="before")
    @classmethod
    def _act_order(cls, v: object) -> object:
        if v is True:
            return "weight"  # the servable mode
        if v is False or (isinstance(v, str) and v in ACT_ORDERS):
            return v
        raise ValueError(f"act_order must be false, true (= 'weight'), 'weight' (static groups, served by vLLM) "
                         f"or 'group' (g_idx; transformers only), got {v!r}")

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, v: object) -> object:
        if not (isinstance(v, str) and v in GRIDS):
            raise ValueError(f"grid must be 'qmax' (max|w| / q_max) or 'full' (max|w| / (q_max + 1/2), "
                             f"compressed-tensors'), got {v!r}")
        return v

    @field_validator("scales", mode="before")
    @classmethod
    def _scales(cls, v: object) -> object:
        if not (v is None or (isinstance(v, str) and v in SCALE_TIMES)):
            raise ValueError(f"scales must be null (the act order's rule), 'sweep' (when the sweep reaches the "
                             f"group) or 'static' (from the original weights), got {v!r}")
        return v

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
        if self.act_order == "weight" and self.group_size is not None and self.scales == "sweep":
            raise ValueError("scales='sweep' contradicts act_order='weight' (static groups: every scale is fixed "
                             "from the original weights); use act_order='group' for scales taken in the sweep")
        return self

    @property
    def has_g_idx(self) -> bool:
        """Whether the groups follow the processing order (act_order "group"): the record carries g_idx."""
        return self.act_order == "group"

    @property
    def static_groups(self) -> bool:
        """Whether every group's scales are fixed from the original weights before the sweep (per channel,
        act_order "weight", or scales "static"), rather than taken from the current weights when the sweep
        reaches the group."""
        if self.group_size is None:
            return True
        if self.scales is not None:
            return self.scales == "static"
        return self.act_order == "weight"

    @property
    def scale_divisor(self) -> float:
        """d in s = max|w| / d: q_max on the "qmax" grid, q_max + 1/2 on the "full" grid."""
        return self.q_max + (0.5 if self.grid == "full" else 0.0)

    @property
    def q_max(self) -> int:
        """Largest code: 2^(bits-1) - 1."""
        return 2 ** (self.bits - 1) - 1

    @property
    def label(self) -> str:
        """Short name, e.g. ``w4g128`` or ``w8ch`` (per channel); ``a`` appended with act order "weight",
        ``ag`` with act order "group", ``s`` with static scales the act order does not imply (``w4g128s``,
        llm-compressor's setting), ``q`` on the "qmax" grid (``w4g128q``)."""
        group = "ch" if self.group_size is None else f"g{self.group_size}"
        implied = self.group_size is None or self.act_order == "weight"
        return (f"w{self.bits}{group}" + {False: "", "weight": "a", "group": "ag"}[self.act_order]
                + ("s" if self.scales == "static" and not implied else "")
                + ("q" if self.grid == "qmax" else ""))

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
    """Scales [rows, 1] of the columns W [rows, c] taken as one group each row: max |w| / d (d = q_max on the
    "qmax" grid, q_max + 1/2 on "full") rounded to `spec.scale_dtype` (1 if all 0), as float32."""
    amax = W.detach().float().abs().amax(dim=1, keepdim=True)  # [rows, 1]
    dtype = torch.bfloat16 if spec.scale_dtype == "bfloat16" else torch.float16
    scale = (amax / spec.scale_divisor).clamp_min(torch.finfo(dtype).tiny).to(dtype).float()  # representable in dtype
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
