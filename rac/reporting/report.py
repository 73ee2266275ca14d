"""A run's report: Markdown + PNGs from the index (evals, per-layer pruning records, stage timings).

Files in `<work_dir>/runs/<run_id>/report/`:
  report.md         the tables (evaluation of dense vs each calibration x sparsity, proxies, stages, layer errors)
  metrics.png       accuracy (95% CI), mean CoT tokens, runaway share, eval wall time per model
  layer_error.png   mean relative reconstruction error per decoder layer (rows: pruned models)
  expert_tokens.png MoE models: routed calibration tokens per layer x expert, prompt vs decode (rac.reporting.coverage)
  tokerror-*.png    per-token reconstruction-error heatmaps, when the run computed them (copied in)

The report is written by the run's last task, before the run row is closed: the status it shows is the one
passed to `write_report(status=...)`, else derived (`report_status`). The Markdown names images by relative
path; `report_markdown_for_artifact` gives the same text with every image inlined as a data URI, for places
where relative paths do not resolve (a Prefect Markdown artifact).
"""

from __future__ import annotations

import base64
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from rac.reporting.coverage import coverage_table, expert_coverage, plot_expert_coverage
from rac.reporting.export import export_command, pruned_models
from rac.reporting.numbers import fmt
from rac.runs.workdir import FileLock, WorkDir
from rac.store.artifacts import atomic_path, atomic_write_text
from rac.store.index import Index


def eval_table(evals: list[dict[str, Any]]) -> str:
    """Markdown table of the evaluation rows of a run."""
    head = ("| model | calibration | method | sparsity | accuracy | 95% CI | mean tok | median tok | p90 tok "
            "| runaway | eval s | tok/s |\n|" + "---|" * 12)
    lines = [head]
    for r in evals:
        lines.append(
            f"| {r['label']} | {r['calibration'] or '-'} | {r['method'] or '-'} | {fmt(r['sparsity'], 2)} "
            f"| {fmt(r['accuracy'])} | [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] | {fmt(r['mean_tokens'], 1)} "
            f"| {fmt(r['median_tokens'], 1)} | {fmt(r['p90_tokens'], 1)} | {fmt(r['runaway_share'])} "
            f"| {fmt(r['wall_s'], 1)} | {fmt(r['tokens_per_s'], 1)} |"
        )
    return "\n".join(lines)


def proxies_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the forward-pass proxies of a run's pruned models."""
    head = ("| model | NLL (dense) | NLL | NLL gap | top-1 agree | KL | positions | recon prompt | recon decode "
            "|\n|" + "---|" * 9)
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['label']} | {fmt(r['dense_nll'], 4)} | {fmt(r['pruned_nll'], 4)} | {fmt(r['nll_gap'], 4)} "
            f"| {fmt(r['top1_agreement'], 4)} | {fmt(r['kl'], 4)} | {r['n_positions']} "
            f"| {fmt(r['recon_prompt'], 4)} | {fmt(r['recon_decode'], 4)} |"
        )
    return "\n".join(lines)


def layer_errors(index: Index, stages: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Pruned-model label -> mean relative error per decoder layer (from the layers table)."""
    out: dict[str, list[float]] = {}
    for s in stages:
        if s["stage"] != "prune":
            continue
        per_layer: dict[int, list[float]] = defaultdict(list)
        for row in index.layer_rows(s["stage_key"]):
            per_layer[int(row["layer"])].append(float(row["rel_error"]))
        if per_layer:
            label = s["name"].split("/", 1)[-1]
            out[label] = [sum(v) / len(v) for _, v in sorted(per_layer.items())]
    return out


def plot_metrics(evals: list[dict[str, Any]], out: Path) -> Path:
    """2x2 bar charts of accuracy (with CI), mean CoT tokens, runaway share and eval time per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in evals]
    fig, axes = plt.subplots(2, 2, figsize=(max(6.0, 1.4 * len(labels) + 3), 7))
    panels = [("accuracy", "accuracy (pass@1)"), ("mean_tokens", "mean CoT tokens"),
              ("runaway_share", "runaway share (hit cap)"), ("wall_s", "eval wall time [s]")]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        vals = [float(r[key] or 0.0) for r in evals]
        err = None
        if key == "accuracy":
            err = [[max(0.0, v - float(r["ci_low"] if r["ci_low"] is not None else v)) for v, r in zip(vals, evals, strict=True)],
                   [max(0.0, float(r["ci_high"] if r["ci_high"] is not None else v) - v) for v, r in zip(vals, evals, strict=True)]]
        ax.bar(range(len(vals)), vals, yerr=err, capsize=3, color=["0.5" if lb == "dense" else "C0" for lb in labels])
        ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if key in ("accuracy", "runaway_share"):
            ax.set_ylim(0.0, 1.0)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def plot_layer_errors(errors: dict[str, list[float]], out: Path) -> Path:
    """Heatmap of mean relative reconstruction error: pruned models x decoder layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(errors)
    width = max(len(v) for v in errors.values())
    grid = np.full((len(labels), width), np.nan)  # [models, layers]
    for i, lb in enumerate(labels):
        grid[i, : len(errors[lb])] = errors[lb]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * width + 3), 0.5 * len(labels) + 2))
    im = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("decoder layer")
    ax.set_title("relative reconstruction error per layer (mean over linears)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def report_status(work_dir: Path | str, run: dict[str, Any], stages: list[dict[str, Any]]) -> str:
    """The status a report shows when none is given: a closed run's row status (`done`, `failed`); for a
    row still `running`/`starting` (the report is the run's last task, written before the row is closed):
    `failed` if a stage failed, `interrupted (rac resume)` when nobody holds the run lock, `in progress` while
    a stage is running, else `done` (every recorded stage done, the run still holding its lock)."""
    if run["status"] not in ("running", "starting"):
        return str(run["status"])
    if any(s["status"] == "failed" for s in stages):
        return "failed"
    if not FileLock(WorkDir(Path(work_dir).resolve()).lock_file(run["run_id"]), "run").is_held():
        return "interrupted (rac resume)"
    if not stages or any(s["status"] != "done" for s in stages):
        return "in progress"
    return "done"


def pruned_section(work_dir: Path | str, run_id: str) -> list[str]:
    """Markdown lines: each finished pruned model's folder and the `rac export` command for it."""
    models = pruned_models(work_dir, run_id, verify=False)
    if not models:
        return []
    lines = ["## Pruned models", "",
             "Each is a Hugging Face folder (weights stored dense, pruned weights as zeros) with "
             "`rac_provenance.json`; `rac export` copies one out with a model card.", "",
             "| model | calibration | method | setting | folder | export |", "|---|---|---|---|---|---|"]
    lines += [f"| {m.label} | {m.calibration or '-'} | {m.method or '-'} | {m.setting} | `{m.folder}` "
              f"| `{export_command(work_dir, run_id, m.label)}` |" for m in models]
    return [*lines, ""]


_IMAGE = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))")


def inline_images(markdown: str, folder: Path | str) -> str:
    """`markdown` with every image whose target is a relative path of a file under `folder` replaced by a
    base64 data URI of that file (PNG: `data:image/png;base64,...`); URLs and data URIs stay."""
    root = Path(folder).resolve()

    def sub(m: re.Match[str]) -> str:
        target = m.group(2)
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("/"):
            return m.group(0)
        path = (root / target).resolve()
        if root not in path.parents or not path.is_file():
            return m.group(0)
        mime = "image/png" if path.suffix.lower() == ".png" else f"image/{path.suffix.lower().lstrip('.') or 'png'}"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"{m.group(1)}data:{mime};base64,{data}{m.group(3)}"

    return _IMAGE.sub(sub, markdown)


def report_markdown_for_artifact(path: Path | str) -> str:
    """The text of report.md at `path` with its images inlined (`inline_images`), for a Prefect Markdown
    artifact (where relative image paths do not resolve); the file itself keeps its relative paths."""
    p = Path(path)
    return inline_images(p.read_text(), p.parent)


def write_report(work_dir: Path | str, run_id: str, status: str | None = None) -> list[Path]:
    """Write report.md and its PNGs for a run from the index; returns the written paths (report.md first).

    `status`: what the report says about the run (the flow's last task passes "done": the run is closed
    right after); None: derived from the run row, its stages and its lock (`report_status`)."""
    index = Index(work_dir)
    run = index.get_run(run_id)
    if run is None:
        raise ValueError(f"no run {run_id!r} in {index.path}; known: {[r['run_id'] for r in index.list_runs()]}")
    out_dir = WorkDir(Path(work_dir).resolve()).report_dir(run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    evals, stages = index.evals(run_id), index.run_stages(run_id)
    written: list[Path] = []
    status = status or report_status(work_dir, run, stages)
    md = [f"# rac run `{run_id}`", "",
          f"status **{status}**; model `{run['fingerprint'].get('model_dir')}` "
          f"(revision {str(run['fingerprint'].get('model_revision'))[:12]}); rac {run['fingerprint'].get('rac_version')}", ""]
    md += pruned_section(work_dir, run_id)
    if evals:
        md += ["## Evaluation", "", eval_table(evals), "", "![metrics](metrics.png)", ""]
        written.append(plot_metrics(evals, out_dir / "metrics.png"))
    proxies = index.proxies(run_id)
    if proxies:
        md += ["## Proxies on the dense model's held-out CoTs", "",
               "Per CoT token, on the dense model's own evaluation CoTs; recon = relative reconstruction error "
               "on the prompt vs decode tokens of the heatmap sequences.", "", proxies_table(proxies), ""]
    errors = layer_errors(index, stages)
    if errors:
        md += ["## Reconstruction error per layer", "", "| model | " + " | ".join(f"L{i}" for i in range(max(map(len, errors.values())))) + " |",
               "|---|" + "---|" * max(map(len, errors.values()))]
        md += [f"| {lb} | " + " | ".join(f"{e:.4f}" for e in errs) + " |" for lb, errs in errors.items()]
        md += ["", "![layer error](layer_error.png)", ""]
        written.append(plot_layer_errors(errors, out_dir / "layer_error.png"))
    coverage = expert_coverage(index, stages)
    if coverage:  # mixture-of-experts models: which experts the prompt and the decode tokens reach
        md += ["## Expert coverage (mixture of experts)", "",
               "Calibration tokens the router sent to each expert (index table `expert_tokens`); experts below "
               "`compress.moe.min_expert_tokens` and their treatment are listed in each model's rac_provenance.json "
               "(`experts.low_token_experts`).", "", coverage_table(coverage), "",
               "![expert tokens](expert_tokens.png)", ""]
        written.append(plot_expert_coverage(coverage, out_dir / "expert_tokens.png"))
    md += _tokerror_section(index, stages, out_dir, written)
    md += ["## Stages", "", "| stage | stage_key | status | reused | seconds |", "|---|---|---|---|---|"]
    md += [f"| {s['name']} | `{s['stage_key']}` | {s['status']} | {bool(s['reused'])} | {fmt(s['seconds'], 1)} |" for s in stages]
    md += ["", f"Config: see `{WorkDir(Path(work_dir)).run_dir(run_id) / 'run.json'}`;",
           f"query the index with `rac --work-dir {work_dir} sql \"select * from evals where run_id = '{run_id}'\"`.", ""]
    written.insert(0, atomic_write_text(out_dir / "report.md", "\n".join(md)))
    return written


def _tokerror_section(index: Index, stages: list[dict[str, Any]], out_dir: Path, written: list[Path]) -> list[str]:
    """Copy per-token error heatmaps of the run (stage 'tokerror') into the report: their means, then the figures
    side by side (one colour scale for all, `rac.eval.tokerror.LOG10_RANGE`; the same sequences when the run
    sets `heatmap_calibration`)."""
    lines: list[str] = []
    figures: list[tuple[str, str]] = []
    for s in stages:
        if s["stage"] != "tokerror" or s["status"] != "done":
            continue
        for row in index.done_stages(s["stage_key"])[:1]:
            pngs = [r for r in row["outputs"] if r.kind == "tokerror-png" and r.check() is None]
            if not pngs:
                continue
            label = s["name"].split("/", 1)[-1]
            dest = out_dir / f"tokerror-{label}.png"
            shutil.copyfile(pngs[0].path, dest)
            written.append(dest)
            summ = row["summary"]
            lines.append(f"- {label}: prompt mean {fmt(summ.get('prompt_mean'), 4)}, "
                         f"decode mean {fmt(summ.get('decode_mean'), 4)}")
            figures.append((label, dest.name))
    if figures:
        lines += ["", "| " + " | ".join(label for label, _ in figures) + " |",
                  "|" + "---|" * len(figures), "| " + " | ".join(f"![{label}]({name})" for label, name in figures) + " |",
                  ""]
    if lines:
        lines = ["## Per-token reconstruction error (prompt vs decode)", "", *lines]
    return lines

