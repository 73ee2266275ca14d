"""Expert coverage of mixture-of-experts runs: which experts the calibration's prompt and decode tokens reach.

From the index table `expert_tokens` (routed calibration tokens per prune stage, layer, expert, segment):
  expert_coverage       label -> {segment: tokens [layers, experts]} for the run's prune stages
  coverage_table        Markdown: per pruned model, experts in all, experts no prompt / no decode token reached
  plot_expert_coverage  `expert_tokens.png`: one row per pruned model, a layer x expert heatmap per segment
                        (prompt, decode; log colour scale, white = no token), dense layers left blank
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rac.store.artifacts import atomic_path
from rac.store.index import Index

SEGMENTS = ("prompt", "decode")  # the two the heatmap compares ("other" is listed in the table when present)


def expert_coverage(index: Index, stages: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Pruned-model label -> segment -> routed tokens # [layers, experts] (NaN: a layer without experts)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for s in stages:
        if s["stage"] != "prune":
            continue
        rows = index.expert_tokens(s["stage_key"])
        if not rows:
            continue
        n_layers = 1 + max(int(r["layer"]) for r in rows)
        n_experts = 1 + max(int(r["expert"]) for r in rows)
        segments = sorted({str(r["segment"]) for r in rows} | set(SEGMENTS))
        grids = {seg: np.full((n_layers, n_experts), np.nan) for seg in segments}
        for r in rows:
            grids[str(r["segment"])][int(r["layer"]), int(r["expert"])] = float(r["tokens"])
        out[s["name"].split("/", 1)[-1]] = grids
    return out


def coverage_table(coverage: dict[str, dict[str, np.ndarray]]) -> str:
    """Markdown table: per pruned model, (layer, expert) pairs and how many no prompt / decode token reached."""
    lines = ["| model | MoE layers | experts (layer x expert) | fewest tokens | no prompt token | no decode token "
             "| decode share of routed tokens (min / median / max) |", "|---|---|---|---|---|---|---|"]
    for label, grids in coverage.items():
        total = sum(np.nan_to_num(g) for g in grids.values())  # [layers, experts]
        moe = ~np.isnan(grids["prompt"]) | ~np.isnan(grids["decode"])
        layers = int(moe.any(axis=1).sum())
        prompt, decode = np.nan_to_num(grids["prompt"])[moe], np.nan_to_num(grids["decode"])[moe]
        share = decode / np.maximum(total[moe], 1.0)
        lines.append(f"| {label} | {layers} | {int(moe.sum())} | {int(total[moe].min())} | {int((prompt == 0).sum())} "
                     f"| {int((decode == 0).sum())} | {share.min():.2f} / {np.median(share):.2f} / {share.max():.2f} |")
    return "\n".join(lines)


def plot_expert_coverage(coverage: dict[str, dict[str, np.ndarray]], out: Path) -> Path:
    """Heatmaps of routed calibration tokens: rows = pruned models, columns = prompt / decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    labels = list(coverage)
    n_layers, n_experts = next(iter(coverage.values()))["prompt"].shape
    fig, axes = plt.subplots(len(labels), len(SEGMENTS), squeeze=False, layout="constrained",
                             figsize=(max(7.0, 0.08 * n_experts * len(SEGMENTS) + 3),
                                      max(1.6, 0.12 * n_layers + 1.0) * len(labels) + 0.8))
    top = max(float(np.nanmax(g)) if np.isfinite(g).any() else 1.0 for grids in coverage.values()
              for g in grids.values())
    norm = LogNorm(vmin=1.0, vmax=max(top, 2.0))
    for i, label in enumerate(labels):
        for j, seg in enumerate(SEGMENTS):
            ax = axes[i][j]
            grid = coverage[label][seg]  # [layers, experts]
            im = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", cmap="viridis", norm=norm,
                           interpolation="nearest")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(f"{seg} tokens", fontsize=10)
            if i == len(labels) - 1:
                ax.set_xlabel("expert", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{label}\nlayer", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="routed calibration tokens (white: none)")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
