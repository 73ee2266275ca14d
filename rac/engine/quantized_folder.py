"""Quantized linears in compressed-tensors `pack-quantized` form: tensor specs, tensors, config, size.

What a folder holds for one quantized linear ``<m>`` (a module name such as ``model.layers.0.mlp.up_proj``),
in place of the dense ``<m>.weight`` [out, in] (c = in, b = bits, G = groups per row, p = 32 // b):
  ``<m>.weight_packed``  I32 [out, ceil(c / p)]  codes + 2^(b-1) (unsigned), p per int32, column j in bits
                         b (j mod p) .. of word j // p (compressed-tensors `pack_to_int32`, packed_dim 1);
  ``<m>.weight_scale``   BF16|F16 [out, G]        G = c / group_size, or 1 per channel;
  ``<m>.weight_shape``   I64 [2]                  (out, in), what unpacking trims the padding to;
  ``<m>.weight_g_idx``   I32 [in]                 only with act order "group": the group of every input column.
Served weight: Ŵ = q * scale[:, g_idx] with the scale in the 16-bit dtype (symmetric, no zero point), which is
`QuantizedWeight.dequantize()` after rounding its float32 scale to that dtype. The 16-bit scale dtype should be
the dtype the model runs in (vLLM loads the scale into a tensor of the model's dtype).

config.json gets ``quantization_config`` = compressed-tensors' `QuantizationConfig` (format pack-quantized,
status compressed, one config group `group_0` targeting class ``Linear``, every other nn.Linear of the model
in ``ignore``, e.g. ``lm_head``) serialized as `ModelCompressor.update_config` does (version, quant_method,
empty sparsity/transform configs). Act order "weight" (static groups; also every per-channel act order) is
written as ``actorder: "weight"`` and has no ``weight_g_idx`` (the tensors are those of no act order); act order
"group" as ``actorder: "group"`` with ``weight_g_idx``; none as ``actorder: null``.

Size (per linear, dense 16-bit = 2 out c bytes): 4 out ceil(c / p) + s out G (+ 4 c with g_idx) + 16, so with
p | c the ratio is b / 16 + s / (2 w) (+ 2 / out with g_idx) for group width w (= c per channel) and s the
scale's bytes: 4-bit g128 0.2578, 4-bit g32 0.2813, 8-bit per channel 0.5 + 1 / c. `size_ratio` gives the
whole folder's tensor-data ratio from the dense specs.

The format checks here are the format's own (shapes, code range, group count, g_idx range): what a given
runtime serves is narrower and documented in docs/quantization.md (vLLM 0.32 refuses actorder group and serves
actorder weight; its CPU kernel serves 4-bit only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rac.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES, dtype_name
from rac.pruners.quant import QuantizedWeight, QuantSpec

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationConfig

SCALE_DTYPES = (torch.bfloat16, torch.float16)
TARGETS = ["Linear"]  # the config group's targets: nn.Linear by class name, minus `ignore`
GROUP_NAME = "group_0"
FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_g_idx")
Specs = Mapping[str, tuple[str, list[int]]]


def _check_scale_dtype(scale_dtype: torch.dtype) -> str:
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be bfloat16 or float16 (the model's 16-bit dtype), got {scale_dtype}")
    return SAFETENSORS_CODES[scale_dtype]


def _check_module_name(name: str) -> None:
    if not name or name.endswith(".weight"):
        raise ValueError(f"expected a module name such as 'model.layers.0.mlp.up_proj', got {name!r}")


def n_groups(in_features: int, spec: QuantSpec) -> int:
    """Groups per row: in / group_size (ValueError unless it divides), 1 per channel."""
    return in_features // spec.group_width(in_features)


def linear_specs(name: str, out_features: int, in_features: int, spec: QuantSpec,
                 scale_dtype: torch.dtype) -> dict[str, tuple[str, list[int]]]:
    """The tensors (name -> (safetensors dtype, shape)) that replace ``<name>.weight`` [out, in]."""
    _check_module_name(name)
    if out_features < 1 or in_features < 1:
        raise ValueError(f"linear {name!r}: shape must be positive, got [{out_features}, {in_features}]")
    code = _check_scale_dtype(scale_dtype)
    pack = 32 // spec.bits
    specs = {
        f"{name}.weight_packed": ("I32", [out_features, math.ceil(in_features / pack)]),
        f"{name}.weight_scale": (code, [out_features, n_groups(in_features, spec)]),
        f"{name}.weight_shape": ("I64", [2]),
    }
    if spec.has_g_idx:
        specs[f"{name}.weight_g_idx"] = ("I32", [in_features])
    return specs


def folder_specs(dense: Specs, linears: Collection[str], spec: QuantSpec,
                 scale_dtype: torch.dtype) -> dict[str, tuple[str, list[int]]]:
    """The dense folder's specs with ``<m>.weight`` of every module in `linears` replaced by its quantized
    tensors; every other tensor (biases, norms, embeddings, LM head) is kept as it is."""
    out = {k: v for k, v in dense.items()}
    for m in linears:
        entry = out.pop(f"{m}.weight", None)
        if entry is None:
            raise ValueError(f"quantized linear {m!r} has no tensor {m + '.weight'!r} in the dense specs")
        shape = entry[1]
        if len(shape) != 2:
            raise ValueError(f"quantized linear {m!r}: weight shape {shape} is not 2-D")
        out.update(linear_specs(m, shape[0], shape[1], spec, scale_dtype))
    return out


def check_quantized(name: str, qw: QuantizedWeight) -> None:
    """ValueError (one line, naming `name`) unless `qw` is a valid symmetric grid weight for its spec."""
    spec = qw.spec
    if qw.q.dtype != torch.int8 or qw.q.dim() != 2:
        raise ValueError(f"linear {name!r}: codes must be a 2-D int8 tensor, got {qw.q.dtype} {list(qw.q.shape)}")
    out, cols = qw.q.shape
    groups = n_groups(cols, spec)
    if list(qw.scale.shape) != [out, groups]:
        raise ValueError(f"linear {name!r}: scale shape {list(qw.scale.shape)} != [{out}, {groups}] "
                         f"for in={cols} and {spec.label}")
    lo, hi = int(qw.q.min()), int(qw.q.max())
    if lo < -spec.q_max - 1 or hi > spec.q_max:
        raise ValueError(f"linear {name!r}: codes span [{lo}, {hi}], outside the {spec.bits}-bit range "
                         f"[{-spec.q_max - 1}, {spec.q_max}]")
    if qw.g_idx is not None:
        if qw.g_idx.dtype != torch.int32 or list(qw.g_idx.shape) != [cols]:
            raise ValueError(f"linear {name!r}: g_idx must be int32 [{cols}], got {qw.g_idx.dtype} "
                             f"{list(qw.g_idx.shape)}")
        if int(qw.g_idx.min()) < 0 or int(qw.g_idx.max()) >= groups:
            raise ValueError(f"linear {name!r}: g_idx spans [{int(qw.g_idx.min())}, {int(qw.g_idx.max())}], "
                             f"outside [0, {groups - 1}]")
        if not spec.has_g_idx and not torch.equal(qw.groups(), torch.arange(cols) // (cols // groups)):
            raise ValueError(f"linear {name!r}: g_idx is not column // group width but spec.act_order is "
                             f"{spec.act_order!r}, not 'group' (the folder would have no weight_g_idx)")


def linear_tensors(name: str, qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of `linear_specs(name, out, in, qw.spec, scale_dtype)` for the quantized weight `qw`.

    The scale is rounded to `scale_dtype` (ValueError if it is not finite and > 0 there); the codes are packed
    by compressed-tensors' `pack_to_int32`. Tensors are on the CPU.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    _check_module_name(name)
    _check_scale_dtype(scale_dtype)
    check_quantized(name, qw)
    scale = qw.scale.detach().cpu().to(scale_dtype)  # [out, G]
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        bad = qw.scale[~(torch.isfinite(scale) & (scale > 0))].flatten()[0].item()
        raise ValueError(f"linear {name!r}: scale {bad!r} is not finite and > 0 in {dtype_name(scale_dtype)}")
    q = qw.q.detach().cpu()  # [out, in] int8
    tensors = {
        f"{name}.weight_packed": pack_to_int32(q, qw.spec.bits),  # [out, ceil(in / p)] int32
        f"{name}.weight_scale": scale.contiguous(),
        f"{name}.weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),  # [2]
    }
    if qw.spec.has_g_idx:
        tensors[f"{name}.weight_g_idx"] = qw.groups().to(torch.int32).cpu()  # [in]
    return tensors


def quantized_fetch(fetch: Callable[[str], Tensor], quantized: Callable[[str], QuantizedWeight],
                    linears: Collection[str], scale_dtype: torch.dtype) -> Callable[[str], Tensor]:
    """A `fetch(name)` for `folder_specs`: tensors of quantized linears come from `quantized(module)` (built
    once per linear; its tensors are asked for one after another), every other name from `fetch`."""
    owner = {f"{m}.{s}": m for m in linears for s in SUFFIXES}
    cache: dict[str, dict[str, Tensor]] = {}

    def get(name: str) -> Tensor:
        m = owner.get(name)
        if m is None:
            return fetch(name)
        if m not in cache:
            cache.clear()
            cache[m] = linear_tensors(m, quantized(m), scale_dtype)
        if name not in cache[m]:
            raise KeyError(f"tensor {name!r} is not written for linear {m!r} (only act order 'group' has g_idx)")
        return cache[m][name]

    return get


def actorder(spec: QuantSpec) -> str | None:
    """compressed-tensors' `actorder` for `spec`: "weight" (static groups, no g_idx), "group" (g_idx) or None."""
    return spec.act_order or None


def quantization_config(spec: QuantSpec, ignore: Iterable[str]) -> QuantizationConfig:
    """compressed-tensors' config for `spec` on every nn.Linear except the module names in `ignore`."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    args = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=True, dynamic=False,
        strategy="channel" if spec.group_size is None else "group", group_size=spec.group_size,
        actorder=actorder(spec),
    )
    scheme = QuantizationScheme(targets=list(TARGETS), weights=args)
    names = list(ignore)
    if len(set(names)) != len(names):
        raise ValueError(f"ignore lists a module twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return QuantizationConfig(config_groups={GROUP_NAME: scheme}, format=FORMAT,
                              quantization_status=QuantizationStatus.COMPRESSED, ignore=names)


def quantization_config_dict(qc: QuantizationConfig) -> dict[str, Any]:
    """The JSON ``quantization_config`` of config.json, laid out as `ModelCompressor.update_config` writes it."""
    import compressed_tensors

    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {},
            **qc.model_dump(mode="json", exclude={"quant_method"})}


def rewrite_config(config_path: Path, spec: QuantSpec, ignore: Sequence[str], scale_dtype: torch.dtype) -> None:
    """Add the quantization config to a copied config.json and set its dtype to the scales' 16-bit dtype.

    ValueError if the config already has a ``quantization_config`` (the source is quantized already)."""
    _check_scale_dtype(scale_dtype)
    path = Path(config_path)
    config = json.loads(path.read_text())
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise ValueError(f"{path} already has a quantization_config (quant_method={method!r})")
    config["quantization_config"] = quantization_config_dict(quantization_config(spec, ignore))
    config["dtype"] = dtype_name(scale_dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(scale_dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of safetensors dtype `dtype` and `shape`."""
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()


def size_ratio(dense: Specs, linears: Collection[str], spec: QuantSpec, scale_dtype: torch.dtype) -> float:
    """Tensor bytes of the quantized folder / tensor bytes of the dense one (safetensors headers and side
    files excluded); the per-linear terms follow the formula in the module docstring."""
    quant = folder_specs(dense, linears, spec, scale_dtype)
    return sum(_nbytes(*v) for v in quant.values()) / sum(_nbytes(*v) for v in dense.values())


def linear_ratio(out_features: int, in_features: int, spec: QuantSpec, dense_bytes: int = 2,
                 scale_bytes: int = 2) -> float:
    """Closed form of one linear's quantized / dense bytes (see the module docstring)."""
    pack = 32 // spec.bits
    width = spec.group_width(in_features)
    quant = (4 * out_features * math.ceil(in_features / pack) + scale_bytes * out_features * (in_features // width)
             + (4 * in_features if spec.has_g_idx else 0) + 16)
    return quant / (dense_bytes * out_features * in_features)
