"""The one table of dtype names: the strings configs use, their torch dtypes, and safetensors' codes.

Configs name dtypes as strings ("bfloat16", "float32"; the short forms "bf16", "fp16", "fp32" are
accepted where a config says so); `torch_dtype` maps a name to torch, restricted to the names a caller
allows, with one error message naming the bad value. Safetensors headers use their own codes ("BF16").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
}
SHORT_NAMES: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def canonical_name(name: str) -> str:
    """"bf16" -> "bfloat16" and so on; a full name is returned as is."""
    return SHORT_NAMES.get(name, name)


def torch_dtype(name: str, allowed: Iterable[str] | None = None) -> torch.dtype:
    """The torch dtype of a config name; ValueError naming it and the allowed names otherwise."""
    known = tuple(allowed) if allowed is not None else tuple(TORCH_DTYPES)
    full = canonical_name(name)
    if full not in known or full not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(known)}")
    return TORCH_DTYPES[full]


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype ("bfloat16" for torch.bfloat16)."""
    for name, dt in TORCH_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no config name; known: {sorted(TORCH_DTYPES)}")


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 dot products


def cpu_bf16_native(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has native bf16 dot products (one of NATIVE_BF16_FLAGS in the `flags` line of
    /proc/cpuinfo, or of `cpuinfo`); None when that cannot be told (no /proc/cpuinfo, no flags line)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[-1].split()) & set(NATIVE_BF16_FLAGS))
    return None


def slow_bf16_warning(dtype: torch.dtype, device: torch.device | str, what: str,
                      cpuinfo: str | None = None) -> str | None:
    """The warning to give when `what` computes in bfloat16 on a CPU without native bf16 (torch then emulates
    it: on an AVX2-only AMD EPYC a bf16 matmul ran at 0.8 GFLOP/s against 43 in float32), else None."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu" or cpu_bf16_native(cpuinfo) is not False:
        return None
    return (f"{what} = 'bfloat16' on a CPU without native bf16 (no {' / '.join(NATIVE_BF16_FLAGS)} in "
            "/proc/cpuinfo): torch emulates bf16 matmuls here, often tens of times slower than float32; "
            "set it to 'float32' on this machine")
