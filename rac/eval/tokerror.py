"""Per-token reconstruction error of a pruned model, per decoder layer, split prompt vs decode.

For every linear of every decoder layer and every token position t of a calibration sequence,
    e_t = ||(W - W_hat) x_t||^2 / ||W x_t||^2
where x_t is the dense model's input to that linear (captured with forward pre-hooks on the dense model)
and W_hat is the same tensor read from the pruned folder's safetensors. A layer's error is the mean over its
linears. The heatmap (layers x token position, one panel per sequence, a line where decode starts) mirrors
the paper's figure; the prompt and decode mean errors are returned.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from rac.segments import SEGMENT_IDS

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def relative_token_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||(W - W_hat) x_t||^2 / ||W x_t||^2 for each row x_t of x, in float32.

    w, w_hat: [out, in]; x: [T, in]; returns [T].
    """
    if w.shape != w_hat.shape or x.shape[-1] != w.shape[1]:
        raise ValueError(f"shape mismatch: W {tuple(w.shape)}, W_hat {tuple(w_hat.shape)}, x {tuple(x.shape)}")
    w, w_hat, x = w.float(), w_hat.float(), x.float()
    num = (x @ (w - w_hat).T).pow(2).sum(-1)  # [T]
    den = (x @ w.T).pow(2).sum(-1)  # [T]
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


class SafetensorsWeights:
    """Read tensors by name from a HF folder's (possibly sharded) safetensors."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = {}
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    files.update({k: f for k in h.keys()})  # noqa: SIM118
        if not files:
            raise ValueError(f"no safetensors weights in {folder}")
        self.folder, self.files = folder, files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"tensor {name!r} not in {self.folder}")
        with safe_open(str(self.files[name]), "pt") as h:
            return h.get_tensor(name)


def sequence_errors(model: Any, pruned: SafetensorsWeights, input_ids: list[int]) -> dict[str, torch.Tensor]:
    """Per-linear per-token relative error for one sequence: {linear name: [T]}."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and LAYER_RE.search(name):
            def hook(m: torch.nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])  # [T, in]
                out[name] = relative_token_error(m.weight,  # type: ignore[arg-type]
                                                 pruned.get(f"{name}.weight"), x)
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
    """One panel per sequence: layers x token position, log10 error, a dashed line where decode starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(mats), 1, figsize=(10, 2.2 * len(mats) + 0.6), squeeze=False)
    for ax, mat, start in zip(axes[:, 0], mats, decode_starts, strict=True):
        im = ax.imshow(torch.log10(mat.clamp_min(1e-12)).numpy(), aspect="auto", cmap="viridis",
                       interpolation="nearest", origin="lower")
        if start is not None:
            ax.axvline(start - 0.5, color="red", linestyle="--", linewidth=1.2, label="decode starts")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="log10 rel. error")
    axes[-1, 0].set_xlabel("token position")
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_png)


def token_error_heatmap(dense_dir: Path, pruned_dir: Path, calib_path: Path, out_png: Path, n_seqs: int = 3,
                        max_tokens: int = 512, prefer_decode: bool = True,
                        title: str | None = None) -> TokenErrorSummary:
    """Errors of `pruned_dir` vs `dense_dir` on a few calibration sequences, plotted to `out_png`
    (titled `title`, default the pruned folder's name)."""
    from transformers import AutoModelForCausalLM

    table = pq.read_table(calib_path)
    segs_all = table.column("segment").to_pylist()
    order = list(range(table.num_rows))
    if prefer_decode:  # sequences with a decode part first, so the prompt/decode boundary is visible
        order.sort(key=lambda i: SEGMENT_IDS["decode"] not in segs_all[i])
    chosen = order[:n_seqs]
    if not chosen:
        raise ValueError(f"calibration set {calib_path} has no sequences")
    model = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    pruned = SafetensorsWeights(Path(pruned_dir))
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
