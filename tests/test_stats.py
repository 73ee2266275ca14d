"""HessianAccumulator: streaming equals one-shot X^T X, masking, segment weights, merge, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rac.data.segments import SEGMENT_IDS
from rac.pruners.stats import HessianAccumulator

D = 12


def _batches(seed: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random (x [B, T, D], segment ids [B, T], token mask [B, T]) batches of varying shapes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b, t = 1 + i % 3, 5 + 3 * i
        x = torch.randn(b, t, D, generator=g)
        seg = torch.randint(0, 3, (b, t), generator=g)
        mask = torch.rand(b, t, generator=g) > 0.3
        out.append((x, seg, mask))
    return out


def _oneshot(batches: list, weights: dict[str, float] | None = None) -> tuple[torch.Tensor, int]:
    """Reference: one float64 X^T X over the kept tokens, each scaled by sqrt(weight of its segment)."""
    rows = []
    for x, seg, mask in batches:
        xs, ss = x.reshape(-1, D)[mask.reshape(-1)], seg.reshape(-1)[mask.reshape(-1)]
        w = torch.ones(len(ss), dtype=torch.float64)
        if weights is not None:
            w = torch.tensor([weights.get(n, 0.0) for n in SEGMENT_IDS], dtype=torch.float64)[ss]
        rows.append(xs.double() * w.sqrt()[:, None])
    X = torch.cat(rows)
    return X.T @ X, X.shape[0]


def _filled(batches: list, **kw: object) -> HessianAccumulator:
    acc = HessianAccumulator(D, **kw)  # type: ignore[arg-type]
    for x, seg, mask in batches:
        acc.add(x, seg, mask)
    return acc


def test_streaming_equals_oneshot_and_masked_tokens_do_not_count() -> None:
    batches = _batches(0)
    acc = _filled(batches)
    H_ref, n_ref = _oneshot(batches)
    torch.testing.assert_close(acc.hessian().double(), H_ref, rtol=1e-5, atol=1e-4)
    assert acc.tokens() == n_ref == sum(int(m.sum()) for _, _, m in batches)
    for name, sid in SEGMENT_IDS.items():
        assert acc.tokens(name) == sum(int(((s == sid) & m).sum()) for _, s, m in batches)


def test_masked_token_values_never_reach_h() -> None:
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    poisoned = x.clone()
    poisoned[1, 3:] = 1e6
    a, b = HessianAccumulator(D), HessianAccumulator(D)
    a.add(x, token_mask=mask)
    b.add(poisoned, token_mask=mask)
    assert torch.equal(a.hessian(), b.hessian())
    assert a.tokens() == a.tokens("other") == 9


@pytest.mark.parametrize("weights", [{"prompt": 0.25, "decode": 2.0, "other": 1.0}, {"decode": 1.0}, {"prompt": 3.0}])
def test_segment_weight_equals_sqrt_scaled_tokens(weights: dict[str, float]) -> None:
    batches = _batches(1)
    acc = _filled(batches)
    H_ref, _ = _oneshot(batches, weights)
    torch.testing.assert_close(acc.hessian(weights).double(), H_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.col_norms(weights).double(), H_ref.diagonal().sqrt(), rtol=1e-5, atol=1e-5)


def test_normalize_divides_by_weighted_token_count() -> None:
    acc = _filled(_batches(2))
    w = {"prompt": 0.5, "decode": 2.0}
    n = 0.5 * acc.tokens("prompt") + 2.0 * acc.tokens("decode")
    torch.testing.assert_close(acc.hessian(w, normalize=True), acc.hessian(w) / n)


def test_merge_of_two_halves_equals_the_whole_and_state_sums() -> None:
    batches = _batches(3, n=6)
    whole, first, second = _filled(batches), _filled(batches[:3]), _filled(batches[3:])
    summed = {k: first.state()[k] + second.state()[k] for k in first.state()}  # what all_reduce does
    first.merge(second)
    torch.testing.assert_close(first.hessians, whole.hessians, rtol=1e-5, atol=1e-4)
    assert torch.equal(first.counts, whole.counts)
    torch.testing.assert_close(summed["hessians"], whole.hessians, rtol=1e-5, atol=1e-4)


def test_save_load_round_trip(tmp_path: Path) -> None:
    acc = _filled(_batches(4), dtype=torch.float64, segments=("prompt", "decode", "other"))
    path = tmp_path / "h.safetensors"
    acc.save(path)
    back = HessianAccumulator.load(path)
    assert torch.equal(back.hessians, acc.hessians) and back.dtype == torch.float64
    assert [back.tokens(s) for s in back.segments] == [acc.tokens(s) for s in acc.segments]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["n_features"] == str(D) and json.loads(meta["tokens"])["decode"] == acc.tokens("decode")
    assert [p.name for p in tmp_path.iterdir()] == ["h.safetensors"]  # no temp file left behind


def test_bf16_input_is_upcast_before_the_product() -> None:
    x = torch.randn(40, D).bfloat16()
    acc = HessianAccumulator(D)
    acc.add(x)
    xf = x.double()
    torch.testing.assert_close(acc.hessian().double(), xf.T @ xf, rtol=1e-6, atol=1e-5)


def test_declared_segments_only() -> None:
    acc = HessianAccumulator(D, segments=("prompt", "decode"))
    acc.add(torch.randn(4, D), torch.tensor([0, 1, 1, 0]))
    assert acc.tokens() == 4 and acc.hessians.shape == (2, D, D)
    with pytest.raises(ValueError, match=r"segment ids \[2\]"):
        acc.add(torch.randn(2, D), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="'other' is not declared"):
        acc.add(torch.randn(2, D))  # no ids means "other"


def test_bad_inputs_name_the_value(tmp_path: Path) -> None:
    acc = HessianAccumulator(D)
    with pytest.raises(ValueError, match=r"\[\.\.\., 12\].*\(3, 5\)"):
        acc.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN/Inf"):
        acc.add(torch.full((2, D), float("nan")))
    with pytest.raises(ValueError, match=r"token_mask.*\(3,\)"):
        acc.add(torch.randn(2, D), token_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"segment ids \[7\]"):
        acc.add(torch.randn(2, D), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="unknown segments.*'answer'"):
        acc.hessian({"answer": 1.0})
    with pytest.raises(ValueError, match="-1.0"):
        acc.hessian({"decode": -1.0})
    with pytest.raises(ValueError, match="weighted token count is 0"):
        acc.hessian(normalize=True)
    with pytest.raises(ValueError, match="n_features.*0"):
        HessianAccumulator(0)
    with pytest.raises(ValueError, match="float16"):
        HessianAccumulator(D, dtype=torch.float16)
    with pytest.raises(ValueError, match="cannot merge.*d=5"):
        acc.merge(HessianAccumulator(5))
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "other"})
    with pytest.raises(ValueError, match="format 'other'"):
        HessianAccumulator.load(bad)


@pytest.mark.parametrize("d", [1024, 1300])
def test_wide_inputs_accumulate_upper_blocks_and_mirror(d: int) -> None:
    """Wide inputs take the upper-block-triangle path: per segment it equals float64 X_s^T X_s over the bf16
    tokens (more tokens than one upcast chunk), H is exactly symmetric, and merging mirrors both sides."""
    from rac.pruners import stats

    assert d >= stats.SYMMETRIC_MIN
    g = torch.Generator().manual_seed(d)
    n = stats.UPCAST_TOKENS + 300
    x = torch.randn(n, d, generator=g).to(torch.bfloat16)
    seg = torch.randint(0, 2, (n,), generator=g)  # prompt / decode ids
    acc = HessianAccumulator(d, segments=("prompt", "decode"))
    acc.add(x[: n // 2], segment_ids=seg[: n // 2])
    acc.add(x[n // 2 :], segment_ids=seg[n // 2 :])
    for slot, name in enumerate(("prompt", "decode")):
        xs = x[seg == SEGMENT_IDS[name]].double()
        ref = xs.T @ xs
        H = acc.hessians[slot]
        assert torch.equal(H, H.T)
        torch.testing.assert_close(H.double(), ref, rtol=1e-5, atol=1e-3)
        assert acc.tokens(name) == xs.shape[0]
    other = HessianAccumulator(d, segments=("prompt", "decode"))
    other.add(x[:10], segment_ids=seg[:10])
    before = acc.hessians.clone()
    acc.merge(other)
    torch.testing.assert_close(acc.hessians, before + other.hessians, rtol=0, atol=0)
