"""Pruners: config rules, default mask scopes, registry, input validation, exact counts, golden masks, dtypes."""

from __future__ import annotations

import pytest
import torch

from rac.pruners import PRUNERS, PruneConfig, get_pruner, magnitude, prune, sparsegpt, wanda
from rac.pruners.base import DEFAULT_SCOPE
from rac.pruners.masks import n_pruned, prune_lowest
from rac.pruners.wanda import col_norms_from_hessian

METHODS = sorted(m for m in PRUNERS if m != "gptq")  # the pruning methods (gptq: tests/test_gptq.py)


def _layer(rows: int, cols: int, seed: int = 0, dead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W [rows, cols] and H = X^T X from correlated X; `dead` inputs never fire (zero column)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * cols, cols, generator=g) @ (torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=g))
    X[:, list(dead)] = 0.0
    return torch.randn(rows, cols, generator=g), X.T @ X


# --- config ------------------------------------------------------------------------------------


def test_nm_implies_sparsity_and_hashes_like_the_explicit_value() -> None:
    implied = PruneConfig(method="wanda", nm=(2, 4))
    assert implied.sparsity == implied.target_sparsity == 0.5
    assert implied.stable_hash() == PruneConfig(method="wanda", nm=(2, 4), sparsity=0.5).stable_hash()
    assert PruneConfig(method="wanda", nm=[4, 8]).nm == (4, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity.*1.0"),
        ({"sparsity": -0.2}, "sparsity.*-0.2"),
        ({"sparsity": float("nan")}, "sparsity.*nan"),
        ({}, "give sparsity"),
        ({"nm": (4, 4)}, "N=4, M=4"),
        ({"nm": (3, 2)}, "N=3, M=2"),
        ({"nm": (2, 4), "sparsity": 0.6}, "sparsity=0.6 contradicts nm=2:4"),
        ({"nm": (2, 4), "scope": "matrix"}, "scope='matrix'"),
        ({"nm": (2, 48)}, "blocksize=128 must be a multiple of M=48"),
        ({"sparsity": 0.5, "damp": 0.0}, "damp.*0.0"),
        ({"sparsity": 0.5, "damp_growth": 1.0}, "damp_growth.*1.0"),
        ({"sparsity": 0.5, "blocksize": 0}, "blocksize must be >= 1, got 0"),
        ({"sparsity": 0.5, "max_retries": -1}, "max_retries must be >= 0, got -1"),
        ({"sparsity": 0.5, "bogus": 1}, "bogus"),
    ],
)
def test_bad_config_names_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruneConfig(method="sparsegpt", **kwargs)


def test_unknown_method_lists_the_known_ones() -> None:
    known = r"'obs'.*\['alps', 'gptq', 'magnitude', 'sparsegpt', 'wanda'\]"
    with pytest.raises(ValueError, match=known):
        get_pruner("obs")
    with pytest.raises(ValueError, match=known):
        PruneConfig(method="obs", sparsity=0.5)


@pytest.mark.parametrize(
    ("method", "expected"),
    [("sparsegpt", "matrix"), ("wanda", "row"), ("magnitude", "row"), ("alps", "row"), ("gptq", "matrix")],
)
def test_scope_defaults_to_the_methods_choice_and_is_named_in_the_canonical_form(method: str, expected: str) -> None:
    amount = {} if method == "gptq" else {"sparsity": 0.5}
    unset = PruneConfig(method=method, **amount)
    assert unset.scope == expected == DEFAULT_SCOPE[method]
    assert unset.canonical()["scope"] == expected
    explicit_none = PruneConfig.model_validate({"method": method, "scope": None, **amount})
    assert explicit_none == unset and explicit_none.stable_hash() == unset.stable_hash()
    assert PruneConfig.model_validate(unset.canonical()) == unset  # the stored form validates back
    other = "row" if expected == "matrix" else "matrix"
    chosen = PruneConfig(method=method, scope=other, **amount)  # type: ignore[arg-type]
    assert chosen.scope == other and chosen.stable_hash() != unset.stable_hash()


@pytest.mark.parametrize("method", METHODS)
def test_nm_scope_is_row_when_unset(method: str) -> None:
    assert PruneConfig(method=method, nm=(2, 4)).scope == "row"
    assert PruneConfig.model_validate({"method": method, "nm": [2, 4], "scope": None}).scope == "row"


def test_pure_pruning_configs_hash_without_a_quant_key() -> None:
    """`quant: None` is left out of the canonical form, so configs that existed before quantization keep
    their hashes (here: the canonical dict has exactly the pruning fields)."""
    cfg = PruneConfig(method="wanda", sparsity=0.5)
    assert "quant" not in cfg.canonical()
    assert set(cfg.canonical()) == set(PruneConfig.model_fields) - {"quant", "allocation"}  # uniform: left out too
    assert PruneConfig.model_validate(cfg.canonical()) == cfg


# --- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_name_the_value(method: str) -> None:
    cfg = PruneConfig(method=method, sparsity=0.5)
    W, H = _layer(4, 8)
    nan_w, inf_h = W.clone(), H.clone()
    nan_w[1, 2] = float("nan")
    inf_h[3, 0] = float("inf")
    cases = [
        (W[0], H, r"W must be a non-empty 2-D.*\(8,\)"),
        (W, H[:5], r"H must be square.*\(5, 8\)"),
        (W, H[:6, :6], r"H shape \(6, 6\) does not match W in_features=8"),
        (nan_w, H, r"W has 1 NaN/Inf.*\(1, 2\)"),
        (W, inf_h, r"H has 1 NaN/Inf.*\(3, 0\)"),
        (W.long(), H, "W must be floating point"),
        (W, H + torch.triu(torch.ones(8, 8), 1), r"H must be symmetric: max \|H - H\^T\| = 1"),
    ]
    for w, h, match in cases:
        with pytest.raises(ValueError, match=match):
            prune(w, h, cfg)
    with pytest.raises(ValueError, match="in_features=8, M=16"):
        prune(W, H, PruneConfig(method=method, nm=(4, 16), blocksize=16))


# --- exact counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "spec",
    [{"sparsity": 0.5}, {"sparsity": 0.37}, {"sparsity": 0.37, "scope": "row"}, {"sparsity": 0.6, "scope": "matrix"},
     {"nm": (2, 4)}, {"nm": (4, 8)}],
)
def test_exact_counts_with_dead_columns_and_ragged_blocks(method: str, spec: dict) -> None:
    rows, cols = 10, 72  # 72 = 2 blocks of 32 + a block of 8
    W, H = _layer(rows, cols, seed=5, dead=(0, 9, 40))
    cfg = PruneConfig(method=method, blocksize=32, **spec)
    res = prune(W, H, cfg)
    pruned = ~res.mask
    if cfg.nm is not None:
        n, m = cfg.nm
        assert (res.mask.reshape(rows, cols // m, m).sum(-1) == n).all()
    elif cfg.scope == "matrix":
        assert int(pruned.sum()) == n_pruned(cfg.target_sparsity, rows * cols)
    else:
        assert (pruned.sum(1) == n_pruned(cfg.target_sparsity, cols)).all()
    if method == "sparsegpt" and cfg.nm is None and cfg.scope == "matrix":  # exact share of every block
        for i1, i2 in ((0, 32), (32, 64), (64, 72)):
            share = n_pruned(cfg.target_sparsity, rows * i2) - n_pruned(cfg.target_sparsity, rows * i1)
            assert int(pruned[:, i1:i2].sum()) == share
    assert (res.weight[pruned] == 0).all()
    assert res.mask.dtype == torch.bool and res.weight.shape == W.shape
    assert res.loss is not None and res.loss >= 0 and res.seconds > 0


@pytest.mark.parametrize("method", METHODS)
def test_bf16_in_bf16_out(method: str) -> None:
    W, H = _layer(6, 16, seed=2)
    res = prune(W.bfloat16(), H, PruneConfig(method=method, nm=(2, 4), blocksize=8))
    assert res.weight.dtype == torch.bfloat16
    assert (res.weight[~res.mask] == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_keeps_everything(method: str) -> None:
    W, H = _layer(5, 12, seed=3)
    res = prune(W, H, PruneConfig(method=method, sparsity=0.0))
    assert res.mask.all()
    torch.testing.assert_close(res.weight, W, rtol=1e-4, atol=1e-4)
    assert abs(res.loss or 0.0) < 1e-3 * float((W @ H * W).sum())


# --- golden masks ------------------------------------------------------------------------------


def test_magnitude_golden() -> None:
    W = torch.tensor([[0.1, -3.0, 2.0, 0.5], [-1.0, 0.2, 0.3, -4.0]])
    res = magnitude(W, PruneConfig(method="magnitude", sparsity=0.5))
    assert res.mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert res.loss is None  # no H given
    assert torch.equal(res.weight, W * res.mask)


def test_wanda_golden_per_row_and_nm() -> None:
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5, -1.0, 1.0, 2.0, -0.5], [0.2, 1.0, -1.0, 2.0, 3.0, -3.0, 0.1, 1.0]])
    norms = torch.tensor([4.0, 1.0, 0.5, 2.0, 1.0, 2.0, 0.25, 8.0])
    # |W| * norms: row 0 = [4, 2, 1.5, 1, 1, 2, 0.5, 4]; row 1 = [0.8, 1, 0.5, 4, 3, 6, 0.025, 8]
    unstructured = wanda(W, norms, PruneConfig(method="wanda", sparsity=0.5)).mask
    assert unstructured.int().tolist() == [[1, 1, 0, 0, 0, 1, 0, 1], [0, 0, 0, 1, 1, 1, 0, 1]]
    nm = wanda(W, norms, PruneConfig(method="wanda", nm=(2, 4))).mask
    assert nm.int().tolist() == [[1, 1, 0, 0, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1]]
    three_eighths = wanda(W, norms, PruneConfig(method="wanda", sparsity=0.375)).mask  # prune 3 per row
    assert three_eighths.int().tolist() == [[1, 1, 1, 0, 0, 1, 0, 1], [0, 1, 0, 1, 1, 1, 0, 1]]


def test_wanda_through_the_registry_uses_sqrt_diag_h() -> None:
    W, H = _layer(7, 24, seed=8)
    cfg = PruneConfig(method="wanda", sparsity=0.5)
    via_h = prune(W, H, cfg)
    direct = wanda(W, H.diagonal().sqrt(), cfg, H)
    assert torch.equal(via_h.mask, direct.mask) and via_h.loss == direct.loss
    with pytest.raises(ValueError, match="negative diagonal"):
        col_norms_from_hessian(-torch.eye(3))


def test_sparsegpt_with_identity_h_is_magnitude_without_update() -> None:
    W, _ = _layer(9, 40, seed=4)
    H = torch.eye(40)
    for spec in ({"sparsity": 0.5}, {"sparsity": 0.5, "scope": "row"}, {"nm": (2, 4)}):  # one block covers the row
        cfg = PruneConfig(method="sparsegpt", **spec)
        res = sparsegpt(W, H, cfg)
        mag = magnitude(W, PruneConfig(method="magnitude", scope=cfg.scope, **{k: v for k, v in spec.items() if k != "scope"}))
        assert torch.equal(res.mask, mag.mask)
        torch.testing.assert_close(res.weight, W * res.mask, rtol=0, atol=1e-6)
        assert res.loss == pytest.approx(float(W[~res.mask].square().sum()), rel=1e-4)
    # blocks of 16: the mask is magnitude inside each block, which gets its share of the row's count
    res = sparsegpt(W, H, PruneConfig(method="sparsegpt", sparsity=0.3, blocksize=16, scope="row"))
    shares = [n_pruned(0.3, 16), n_pruned(0.3, 32) - n_pruned(0.3, 16), n_pruned(0.3, 40) - n_pruned(0.3, 32)]
    expected = torch.cat([prune_lowest(W[:, i : i + 16].abs(), k, dim=1) for i, k in zip((0, 16, 32), shares, strict=True)], 1)
    assert shares == [5, 5, 2] and torch.equal(res.mask, expected)
    torch.testing.assert_close(res.weight, W * res.mask, rtol=0, atol=1e-6)
    # the default (per block over all rows): each block gets its share of the matrix's count, over all 9 rows
    res = sparsegpt(W, H, PruneConfig(method="sparsegpt", sparsity=0.3, blocksize=16))
    shares = [n_pruned(0.3, 9 * 16), n_pruned(0.3, 9 * 32) - n_pruned(0.3, 9 * 16), n_pruned(0.3, 9 * 40) - n_pruned(0.3, 9 * 32)]
    blocks = [W[:, i : i + 16].abs() for i in (0, 16, 32)]
    expected = torch.cat([prune_lowest(b.reshape(-1), k, dim=0).reshape(b.shape) for b, k in zip(blocks, shares, strict=True)], 1)
    assert shares == [43, 43, 22] and torch.equal(res.mask, expected)
    assert len(set((~res.mask).sum(1).tolist())) > 1  # rows differ: the count is per block, not per row
    torch.testing.assert_close(res.weight, W * res.mask, rtol=0, atol=1e-6)
