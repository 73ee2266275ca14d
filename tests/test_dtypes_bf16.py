"""rac.dtypes.cpu_bf16_native / slow_bf16_warning: read from /proc/cpuinfo-shaped text, and the engine warns."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import rac.dtypes as dtypes
from rac.dtypes import cpu_bf16_native, slow_bf16_warning

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"
SPR = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_native_bf16_is_read_from_the_flags_line() -> None:
    assert cpu_bf16_native(AVX2) is False
    assert cpu_bf16_native(SPR) is True
    assert cpu_bf16_native(AVX2.replace("avx2", "avx2 avx512_bf16")) is True
    assert cpu_bf16_native("processor\t: 0\n") is None  # no flags line: unknown, never a warning
    assert cpu_bf16_native(AVX2.replace("avx2", "xamx_bf16x")) is False  # whole flags only


def test_the_warning_names_the_setting_only_where_bf16_is_emulated() -> None:
    msg = slow_bf16_warning(torch.bfloat16, "cpu", "compress.compute_dtype", AVX2)
    assert msg is not None and msg.startswith("compress.compute_dtype = 'bfloat16' on a CPU without native bf16")
    assert slow_bf16_warning(torch.bfloat16, "cpu", "x", SPR) is None
    assert slow_bf16_warning(torch.float32, "cpu", "x", AVX2) is None
    assert slow_bf16_warning(torch.bfloat16, "cuda", "x", AVX2) is None
    assert slow_bf16_warning(torch.bfloat16, "cpu", "x", "no flags") is None


def test_compress_warns_on_an_emulating_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rac.engine import CompressConfig, compress
    from rac.models.assets import tiny_model
    from rac.pruners.base import PruneConfig
    from tests.engine_support import random_sequences, write_calib

    calib = write_calib(tmp_path / "c.parquet", random_sequences(2, 500, [8]))
    cfg = CompressConfig(prune=PruneConfig(sparsity=0.5), compute_dtype="bfloat16", act_dtype="bfloat16")
    for cpuinfo, expect in ((AVX2, 1), (SPR, 0)):
        monkeypatch.setattr(dtypes, "cpu_bf16_native", lambda _=None, c=cpuinfo: "avx512_bf16" in c)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compress(tiny_model("llama"), calib, tmp_path / f"out{expect}", cfg, tmp_path / f"work{expect}")
        hits = [w for w in seen if "without native bf16" in str(w.message)]
        assert len(hits) == expect
