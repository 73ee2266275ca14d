"""The pure helpers of bench.peer_gptq (no llm-compressor needed): the packed-code reader, the shared
per-linear loss, the reference RTN grid and the per-layer summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench.peer_gptq import (
    compare_formats,
    dequantize,
    folder_codes,
    folder_format,
    layer_means,
    output_error_sums,
    relative_output_error,
    rtn_minmax_grid,
    type_means,
    unpack_int32,
)
from rac.engine.quantized_folder import linear_tensors, quantization_config, quantization_config_dict
from rac.pruners.quant import QuantizedWeight, QuantSpec, rtn


def _random_qw(rows: int, cols: int, spec: QuantSpec, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1), (rows, cols), generator=g, dtype=torch.int8)
    scale = (torch.rand(rows, cols // spec.group_width(cols), generator=g) + 0.1).to(torch.bfloat16).float()
    return QuantizedWeight(q=q, scale=scale, g_idx=None, spec=spec)


@pytest.mark.parametrize("bits,cols", [(4, 256), (4, 100), (8, 128)])
def test_unpack_inverts_the_writers_packing(bits: int, cols: int) -> None:
    spec = QuantSpec.model_validate({"bits": bits, "group_size": None if cols == 100 else 128})
    qw = _random_qw(24, cols, spec)
    packed = linear_tensors("model.layers.0.mlp.up_proj", qw, torch.bfloat16)["model.layers.0.mlp.up_proj.weight_packed"]
    assert torch.equal(unpack_int32(packed, bits, cols), qw.q)


def test_unpack_bit_layout_by_hand() -> None:
    # column j of a 4-bit row sits in bits 4j..4j+3 as code + 8: codes [-8, -1, 0, 7, 1, 2, 3, -3]
    word = 0 | (7 << 4) | (8 << 8) | (15 << 12) | (9 << 16) | (10 << 20) | (11 << 24) | (5 << 28)
    packed = torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32)
    assert unpack_int32(packed, 4, 8).tolist() == [[-8, -1, 0, 7, 1, 2, 3, -3]]


def test_dequantize_matches_the_record() -> None:
    qw = _random_qw(16, 256, QuantSpec(bits=4, group_size=128), seed=1)
    assert torch.equal(dequantize(qw.q, qw.scale), qw.dequantize())


def test_relative_output_error_is_the_brute_force_sum() -> None:
    g = torch.Generator().manual_seed(2)
    W, X = torch.randn(12, 40, generator=g), torch.randn(30, 40, generator=g)
    W_hat = W + 0.1 * torch.randn(12, 40, generator=g)
    num = sum(float(((W - W_hat) @ X[t]).square().sum()) for t in range(X.shape[0]))
    den = sum(float((W @ X[t]).square().sum()) for t in range(X.shape[0]))
    assert output_error_sums(W, W_hat, X) == pytest.approx((num, den), rel=1e-5)
    assert relative_output_error(W, W_hat, X) == pytest.approx(num / den, rel=1e-5)
    assert relative_output_error(W, W, X) == 0.0


def test_folder_codes_reads_what_rac_writes(tmp_path: Path) -> None:
    spec = QuantSpec(bits=4, group_size=128)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    qws = {n: _random_qw(8 * (i + 1), 256, spec, seed=i) for i, n in enumerate(names)}
    tensors = {k: v for n, qw in qws.items() for k, v in linear_tensors(n, qw, torch.bfloat16).items()}
    tensors["model.embed_tokens.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    qc = quantization_config_dict(quantization_config(spec, ["lm_head"]))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    codes = folder_codes(tmp_path)
    assert sorted(codes) == sorted(names)
    for n, qw in qws.items():
        assert torch.equal(codes[n].q, qw.q)
        assert torch.equal(dequantize(codes[n].q, codes[n].scale), qw.dequantize())
    fmt = folder_format(tmp_path)
    same = compare_formats(fmt, fmt)
    assert same["only_first"] == same["only_second"] == same["dtype_or_shape"] == [] and same["weights_args"] == {}


def test_rtn_reference_grid() -> None:
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    seven = rtn_minmax_grid(W, 7.0)
    ref = rtn(W, QuantSpec(bits=4, group_size=128, grid="qmax"))
    assert torch.equal(seven.q, ref.q) and torch.equal(seven.scale, ref.scale)
    wide = rtn_minmax_grid(W, 7.5)  # the whole [-8, 7] range: a finer step, and -8 is used
    assert int(wide.q.min()) == -8 and int(wide.q.max()) <= 7
    assert bool((wide.scale < seven.scale).all())
    full = rtn(W, QuantSpec(bits=4, group_size=128))  # rac's default grid is compressed-tensors' max|w| / 7.5
    assert torch.equal(wide.q, full.q) and torch.equal(wide.scale, full.scale)


def test_layer_and_type_means() -> None:
    rel = {"model.layers.0.self_attn.q_proj": 0.1, "model.layers.0.mlp.down_proj": 0.3,
           "model.layers.2.self_attn.q_proj": 0.5}
    assert layer_means(rel) == pytest.approx({0: 0.2, 2: 0.5})
    assert type_means(rel) == pytest.approx({"q_proj": 0.3, "down_proj": 0.3})


def _rtn_folder(model_dir: Path, out: Path, spec: QuantSpec) -> Path:
    """A W4 folder of a tiny model by RTN on every decoder linear, through rac's compressed-tensors writer."""
    from safetensors import safe_open

    from rac.engine.output import write_hf_folder
    from rac.engine.quantized_folder import folder_specs, quantized_fetch, rewrite_config

    shard = next(model_dir.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        dense = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    linears = sorted(k[: -len(".weight")] for k in dense if ".layers." in k and k.endswith("_proj.weight"))
    fetch = quantized_fetch(tensors.__getitem__, lambda m: rtn(tensors[m + ".weight"], spec), linears, torch.bfloat16)
    write_hf_folder(model_dir, out, folder_specs(dense, linears, spec, torch.bfloat16), fetch, {"built_by": "test"})
    rewrite_config(out / "config.json", spec, ["lm_head"], torch.bfloat16)
    return out


def test_linear_errors_on_a_tiny_model(tmp_path: Path) -> None:
    """Batched and unbatched passes agree, and each linear's error is the one of its captured dense inputs."""
    from bench.peer_gptq import linear_errors
    from rac.models.assets import tiny_model
    from rac.models.loading import load_causal_lm

    dense_dir = tiny_model("qwen2")
    folder = _rtn_folder(dense_dir, tmp_path / "w4", QuantSpec(bits=4, group_size=32))
    seqs = [[5, 9, 11, 3, 7, 2], [4, 4, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    one = linear_errors(dense_dir, {"rtn": folder}, seqs, torch.float32, batch_size=1)["rtn"]
    batched = linear_errors(dense_dir, {"rtn": folder}, seqs, torch.float32, batch_size=3)["rtn"]
    assert one.keys() == batched.keys() and len(one) > 0
    for n in one:
        assert batched[n]["rel"] == pytest.approx(one[n]["rel"], rel=1e-4)
    name = "model.layers.0.mlp.down_proj"
    model = load_causal_lm(dense_dir, torch.float32)
    xs: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: xs.append(a[0][0].detach()))
    with torch.inference_mode():
        for ids in seqs:
            model(input_ids=torch.tensor([ids]))
    handle.remove()
    c = folder_codes(folder)[name]
    W = model.get_submodule(name).weight.detach()  # type: ignore[operator]
    expect = relative_output_error(W, dequantize(c.q, c.scale), torch.cat(xs))
    assert one[name]["rel"] == pytest.approx(expect, rel=1e-4)
    assert 0 < expect < 1
