"""Per-token reconstruction error of a pruned model, per decoder layer, split prompt vs decode.

For every linear of every decoder layer and every token position t of a calibration sequence,
    e_t = ||(W - W_hat) x_t||^2 / ||W x_t||^2
where x_t is the dense model's input to that linear (captured with forward pre-hooks on the dense model)
and W_hat is the same tensor as the pruned folder serves it (read from its safetensors; from a quantized
compressed-tensors folder, as transformers decompresses it). A layer's error is the mean over its
linears. The heatmap (layers x token position, one panel per sequence, a line where decode starts) mirrors
the paper's figure; the prompt and decode mean errors are returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from rac.data.segments import SEGMENT_IDS
from rac.models.loading import load_causal_lm
from rac.models.streaming import WeightFiles
from rac.pruners.error import per_token_error
from rac.store.artifacts import atomic_path

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
LOG10_RANGE = (-4.0, 0.5)  # one colour scale for every heatmap, so two models' figures compare directly


def served_weights(pruned_dir: Path) -> Callable[[str], torch.Tensor]:
    """`weight(name)` of the pruned folder as it is served: straight from the safetensors, or, for a quantized
    (compressed-tensors) folder, the decompressed weights of the model transformers loads from it."""
    config = json.loads((Path(pruned_dir) / "config.json").read_text())
    if "quantization_config" not in config:
        files = WeightFiles(Path(pruned_dir))
        return lambda key: files.load([key])[key]
    model = load_causal_lm(Path(pruned_dir), torch.float32, trust_remote_code=False)  # decompressed at load
    weights = {f"{n}.weight": m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return lambda key: weights[key]


def sequence_errors(model: Any, pruned: Callable[[str], torch.Tensor], input_ids: list[int]) -> dict[str, torch.Tensor]:
    """Per-linear per-token relative error for one sequence: {linear name: [T]} (`per_token_error`; a token
    whose dense output is 0 counts as error 0)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and LAYER_RE.search(name):
            def hook(m: torch.nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])  # [T, in]
                key = f"{name}.weight"
                err = per_token_error(m.weight, pruned(key), x)  # type: ignore[arg-type]
                out[name] = err.nan_to_num(nan=0.0)
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([input_ids]))
    finally:
        for h in handles:
            h.remove()
    if not out:
        raise ValueError("no decoder-layer linears found (module names without 'layers.<i>.')")
    return out


def layer_matrix(per_linear: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over each layer's linears: [L, T], layers in index order."""
    by_layer: dict[int, list[torch.Tensor]] = {}
    for name, e in per_linear.items():
        m = LAYER_RE.search(name)
        assert m is not None
        by_layer.setdefault(int(m.group(1)), []).append(e)
    return torch.stack([torch.stack(by_layer[i]).mean(0) for i in sorted(by_layer)])


@dataclass(frozen=True)
class TokenErrorSummary:
    """Mean errors over prompt and decode tokens, per-layer means, and the written figure."""

    prompt_mean: float
    decode_mean: float
    layer_prompt_mean: list[float]
    layer_decode_mean: list[float]
    n_seqs: int
    n_tokens: int
    png: str
    seq_ids: list[int] = field(default_factory=list)


def plot_heatmap(mats: list[torch.Tensor], decode_starts: list[int | None], out_png: Path, title: str) -> None:
    """One panel per sequence: layers x token position, log10 error on the fixed scale LOG10_RANGE, a dashed
    line where decode starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(mats), 1, figsize=(10, 2.2 * len(mats) + 0.6), squeeze=False)
    for ax, mat, start in zip(axes[:, 0], mats, decode_starts, strict=True):
        im = ax.imshow(torch.log10(mat.clamp_min(1e-12)).numpy(), aspect="auto", cmap="viridis",
                       interpolation="nearest", origin="lower", vmin=LOG10_RANGE[0], vmax=LOG10_RANGE[1])
        if start is not None:
            ax.axvline(start - 0.5, color="red", linestyle="--", linewidth=1.2, label="decode starts")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="log10 rel. error")
    axes[-1, 0].set_xlabel("token position")
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def token_error_heatmap(dense_dir: Path, pruned_dir: Path, calib_path: Path, out_png: Path, n_seqs: int = 3,
                        max_tokens: int = 512, prefer_decode: bool = True,
                        title: str | None = None) -> TokenErrorSummary:
    """Errors of `pruned_dir` vs `dense_dir` on a few calibration sequences, plotted to `out_png`
    (titled `title`, default the pruned folder's name)."""
    table = pq.read_table(calib_path)
    segs_all = table.column("segment").to_pylist()
    order = list(range(table.num_rows))
    if prefer_decode:  # sequences with a decode part first, so the prompt/decode boundary is visible
        order.sort(key=lambda i: SEGMENT_IDS["decode"] not in segs_all[i])
    chosen = order[:n_seqs]
    if not chosen:
        raise ValueError(f"calibration set {calib_path} has no sequences")
    model = load_causal_lm(dense_dir, torch.float32, trust_remote_code=False)  # no setting in ReportConfig
    pruned = served_weights(Path(pruned_dir))
    mats, starts, p_err, d_err = [], [], [], []
    for i in chosen:
        ids = table.column("input_ids")[i].as_py()[:max_tokens]
        seg = torch.tensor(segs_all[i][:max_tokens])  # [T]
        mat = layer_matrix(sequence_errors(model, pruned, ids))  # [L, T]
        mats.append(mat)
        dec = (seg == SEGMENT_IDS["decode"]).nonzero()
        starts.append(int(dec[0]) if len(dec) else None)
        p_err.append(mat[:, seg == SEGMENT_IDS["prompt"]])
        d_err.append(mat[:, seg == SEGMENT_IDS["decode"]])
    plot_heatmap(mats, starts, Path(out_png), f"per-token reconstruction error: {title or Path(pruned_dir).name}")
    pm, dm = torch.cat(p_err, 1), torch.cat(d_err, 1)  # [L, Tp], [L, Td]

    def mean(x: torch.Tensor) -> float:
        return float(x.mean()) if x.numel() else float("nan")

    return TokenErrorSummary(
        prompt_mean=mean(pm), decode_mean=mean(dm),
        layer_prompt_mean=[mean(r) for r in pm], layer_decode_mean=[mean(r) for r in dm],
        n_seqs=len(chosen), n_tokens=sum(m.shape[1] for m in mats), png=str(out_png), seq_ids=chosen,
    )
