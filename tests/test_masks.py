"""Masks: exact pruned counts (row, matrix, N:M), golden hand-computed masks, validation."""

from __future__ import annotations

import math

import pytest
import torch

from rac.pruners.masks import all_finite, check_nm, make_mask, n_pruned, nm_mask, unstructured_mask


@pytest.mark.parametrize(
    ("sparsity", "n", "expected"),
    [(0.5, 7, 4), (0.25, 10, 3), (0.0, 9, 0), (0.5, 8, 4), (0.3, 10, 3), (0.99, 3, 3), (0.1, 4, 0)],
)
def test_n_pruned_rounds_half_up(sparsity: float, n: int, expected: int) -> None:
    assert n_pruned(sparsity, n) == expected == math.floor(sparsity * n + 0.5)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_row_mask_prunes_exactly_the_lowest_per_row(sparsity: float) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(9, 37, generator=g)
    keep = unstructured_mask(scores, sparsity, "row")
    k = n_pruned(sparsity, 37)
    assert ((~keep).sum(1) == k).all()
    for row, kr in zip(scores, keep, strict=True):  # brute force: the k smallest by a full sort
        expected = set(torch.argsort(row)[:k].tolist())
        assert set((~kr).nonzero().flatten().tolist()) == expected


def test_matrix_mask_prunes_exactly_the_global_lowest() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(6, 10, generator=g) * torch.arange(1, 7)[:, None]  # rows differ in scale
    keep = unstructured_mask(scores, 0.45, "matrix")
    assert int((~keep).sum()) == n_pruned(0.45, 60) == 27
    assert scores[~keep].max() < scores[keep].min()
    assert len(set((~keep).sum(1).tolist())) > 1  # per-row counts differ: it is a matrix-wide rule


def test_nm_golden_2_4() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 0.9], [1.0, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0]])
    expected = torch.tensor(
        [[1, 0, 1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool
    )
    assert torch.equal(nm_mask(scores, 2, 4), expected)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_keeps_exactly_n_per_group(n: int, m: int) -> None:
    scores = torch.rand(5, 4 * m, generator=torch.Generator().manual_seed(3))
    keep = nm_mask(scores, n, m).reshape(5, 4, m)
    assert (keep.sum(-1) == n).all()
    groups = scores.reshape(5, 4, m)
    assert (groups.masked_fill(~keep, float("inf")).amin(-1) >= groups.masked_fill(keep, -1.0).amax(-1)).all()


def test_make_mask_dispatches() -> None:
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(make_mask(scores, 0.5, (2, 4)), nm_mask(scores, 2, 4))
    assert torch.equal(make_mask(scores, 0.25, None, "matrix"), unstructured_mask(scores, 0.25, "matrix"))


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5])
def test_bad_sparsity_names_value(bad: float) -> None:
    with pytest.raises(ValueError, match=f"sparsity.*{bad}"):
        unstructured_mask(torch.rand(2, 4), bad)


@pytest.mark.parametrize(("n", "m"), [(4, 4), (5, 4), (0, 4), (-1, 2)])
def test_bad_nm_names_values(n: int, m: int) -> None:
    with pytest.raises(ValueError, match=f"N={n}, M={m}"):
        check_nm(n, m)


def test_nm_width_not_multiple_names_both() -> None:
    with pytest.raises(ValueError, match="in_features=10, M=4"):
        nm_mask(torch.rand(2, 10), 2, 4)


def test_scores_validation() -> None:
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        unstructured_mask(torch.rand(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="NaN/Inf"):
        unstructured_mask(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="scope.*'col'"):
        unstructured_mask(torch.rand(2, 4), 0.5, "col")  # type: ignore[arg-type]


def test_all_finite_exact_even_when_the_sum_overflows() -> None:
    big = torch.full((4,), 3e38)
    assert all_finite(big)  # the sum overflows to inf, the entries are finite
    assert not all_finite(torch.tensor([1.0, float("inf")]))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
