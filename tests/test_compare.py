"""rac.reporting.compare: paired bootstrap intervals against exact enumeration of the resampling distribution."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rac.reporting.compare import collect_cells, paired_difference, paired_rows, write_comparison
from rac.store.index import Index


def exact_bootstrap_quantiles(d: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Quantiles of the mean over every one of the P^P equally likely resamples (brute force)."""
    means = np.array([d[list(ix)].mean() for ix in itertools.product(range(d.size), repeat=d.size)])
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def test_paired_difference_matches_exact_bootstrap() -> None:
    a = np.array([1.0, 1.0, 0.0, 1.0, 0.5, 1.0])
    b = np.array([0.0, 1.0, 0.0, 0.0, 0.5, 1.0])
    diff, lo, hi = paired_difference(a, b, n_boot=200_000, seed=1)
    ex_lo, ex_hi = exact_bootstrap_quantiles(a - b)
    assert diff == pytest.approx(0.5 / 3 + 1 / 6)  # mean of [1, 0, 0, 1, 0, 0]
    assert lo == pytest.approx(ex_lo, abs=0.02) and hi == pytest.approx(ex_hi, abs=0.02)


def test_pairing_is_tighter_than_two_separate_intervals() -> None:
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(float)
    treat = base.copy()
    treat[rng.choice(200, 12, replace=False)] = 1.0  # a few extra problems solved, the rest identical
    diff, lo, hi = paired_difference(treat, base, n_boot=5000)
    sep = 1.96 * np.sqrt(treat.var() / 200 + base.var() / 200)  # unpaired normal half-width
    assert lo > 0 and (hi - lo) / 2 < sep / 2


def test_paired_difference_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        paired_difference(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference(np.ones(0), np.ones(0))


def _run(idx: Index, work: Path, run: str, model: str, variants: int, label: str, correct: list[bool]) -> None:
    """A run of `model` with one evaluated model `label` on `len(correct)` problems of an eval set."""
    ev = {"prompts": {"source": "gsm8k", "holdout": "eval", "variants": variants},
          "generation": {"temperature": 0.0, "max_new_tokens": 512, "batch_size": variants}}  # batch: no result
    idx.create_run(run, run, {"model": model, "eval": ev}, {}, "", 1)
    key = f"{run}-{label}"
    folder = work / "stages" / "eval" / key
    folder.mkdir(parents=True)
    pids = [f"{model}-{variants}-p{i}" for i in range(len(correct))]
    pq.write_table(pa.table({"prompt_id": pids, "correct": correct, "finish_reason": ["stop"] * len(correct)}),
                   folder / "rows.parquet")
    prompts = work / "stages" / "prompts" / key
    prompts.mkdir(parents=True)  # variants of one problem share its group id
    pq.write_table(pa.table({"prompt_id": pids, "group_id": [f"g{i // variants}" for i in range(len(pids))]}),
                   prompts / "prompts.parquet")
    calib = None if label == "dense" else label.split("-")[0]
    idx.record_eval(run, label, key, {"calibration": calib, "method": calib and "sparsegpt",
                                      "sparsity": calib and 0.5, "accuracy": float(np.mean(correct))})


def test_cells_are_grouped_by_model_and_eval_set(tmp_path: Path) -> None:
    idx = Index(tmp_path)
    _run(idx, tmp_path, "a1", "qwen", 1, "rac-sparsegpt-50pct", [True, False])
    _run(idx, tmp_path, "a2", "qwen", 1, "prompt-sparsegpt-50pct", [False, False])  # same group, second run
    _run(idx, tmp_path, "b1", "/models/smol", 1, "rac-sparsegpt-50pct", [True, True, True])  # same label
    _run(idx, tmp_path, "c1", "qwen", 2, "rac-sparsegpt-50pct", [False, True, True, True])  # second eval set
    _run(idx, tmp_path, "c2", "qwen", 2, "prompt-sparsegpt-50pct", [False, False, True, True])
    cells = collect_cells(tmp_path)
    by = {(c.group.split(",")[0], len(c.per_problem), c.label): c.get("accuracy") for c in cells}
    assert by == {("qwen", 2, "rac-sparsegpt-50pct"): 0.5, ("qwen", 2, "prompt-sparsegpt-50pct"): 0.0,
                  ("smol", 3, "rac-sparsegpt-50pct"): 1.0, ("qwen", 4, "rac-sparsegpt-50pct"): 0.75,
                  ("qwen", 4, "prompt-sparsegpt-50pct"): 0.5}
    assert len({c.group for c in cells}) == 3 and any("x2 variants" in c.group for c in cells)
    rows = paired_rows([c for c in cells if c.group.startswith("qwen") and "variants" not in c.group], "rac", "prompt")
    assert [(r["n"], r["accuracy_diff"]) for r in rows] == [(2, 0.5)]  # paired within its own group only
    variants = paired_rows([c for c in cells if "variants" in c.group], "rac", "prompt", n_boot=20_000)
    # d = [0, 1 | 0, 0] in 2 clusters: resampled means are 0, 1/4 or 1/2 (per problem, 3/4 would reach 97.5%)
    assert [(r["n"], r["groups"], r["accuracy_diff"], r["accuracy_low"], r["accuracy_high"]) for r in variants] \
        == [(4, 2, 0.25, 0.0, 0.5)]
    written = write_comparison(tmp_path, tmp_path / "cmp", bases=("prompt",))
    md = written[0].read_text()
    assert "| rac - prompt | 4 (2 groups) |" in md
    assert md.count("# qwen") == 2 and md.count("# smol") == 1 and len(written) == 4
    assert all(p.name.startswith("vs_sparsity-") and p.stat().st_size > 0 for p in written[1:])


def test_chosen_pairs_match_the_calibration_pairing_and_brute_force(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from rac.reporting.compare import label_pairs
    from rac_prefect.flows.cli import EXIT_BAD_INPUT, EXIT_OK, main

    rac_ok = [True, True, False, True, False, True, True, False]
    prompt_ok = [False, True, False, False, False, True, False, False]
    idx = Index(tmp_path)
    _run(idx, tmp_path, "a1", "qwen", 1, "rac-sparsegpt-50pct", rac_ok)
    _run(idx, tmp_path, "a2", "qwen", 1, "prompt-sparsegpt-50pct", prompt_ok)
    cells = collect_cells(tmp_path)
    by_label = label_pairs(cells, (("rac-sparsegpt-50pct", "prompt-sparsegpt-50pct"),), n_boot=4000)
    (row,) = next(iter(by_label.values()))
    (by_calib,) = paired_rows(cells, "rac", "prompt", n_boot=4000)
    keys = ("n", "accuracy_diff", "accuracy_low", "accuracy_high", "runaway_diff")
    assert [row[k] for k in keys] == [by_calib[k] for k in keys]  # the same pairing, reached by label
    assert row["accuracy_diff"] == pytest.approx(np.mean(np.array(rac_ok, float) - np.array(prompt_ok, float)))
    assert (row["treat"], row["base"]) == ("rac-sparsegpt-50pct", "prompt-sparsegpt-50pct")
    reverse = label_pairs(cells, (("prompt-sparsegpt-50pct", "rac-sparsegpt-50pct"),), n_boot=4000)
    assert next(iter(reverse.values()))[0]["accuracy_diff"] == pytest.approx(-row["accuracy_diff"])
    with pytest.raises(ValueError, match=r"--pair rac-sparsegpt-50pct:nope: no model 'nope' in the work dir"):
        label_pairs(cells, (("rac-sparsegpt-50pct", "nope"),))

    out = tmp_path / "cmp"
    assert main(["--work-dir", str(tmp_path), "compare", "--out", str(out), "--base", "prompt",
                 "--pair", "rac-sparsegpt-50pct:prompt-sparsegpt-50pct"]) == EXIT_OK
    md = (out / "compare.md").read_text()
    assert "## Paired differences (chosen models)" in md
    assert "| rac-sparsegpt-50pct - prompt-sparsegpt-50pct | 8 |" in md
    for bad in ("rac-sparsegpt-50pct", "rac-sparsegpt-50pct:", "rac-sparsegpt-50pct:ghost"):
        (out / "compare.md").unlink(missing_ok=True)
        assert main(["--work-dir", str(tmp_path), "compare", "--out", str(out), "--pair", bad]) == EXIT_BAD_INPUT
        assert not (out / "compare.md").exists()  # refused before anything is written
    assert "ghost" in capsys.readouterr().err
