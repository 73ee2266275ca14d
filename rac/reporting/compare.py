"""Compare calibrations across the runs of one work dir: tables, paired intervals and plots (`rac compare`).

A *cell* is one pruned model (calibration x method x sparsity/N:M) with its evaluation, its forward-pass
proxies and its pruning time. Cells are grouped by base model and evaluation set (the run config's `model`
and the result-defining part of its `eval` section); within a group the newest record of each label wins, so
a grid split over several configs (or resumed runs) reads as one, while a second model or a second eval set
in the same work dir gets its own tables. Accuracy differences between two calibrations at the same
pruning setting are paired: the per-problem pass rates of both models on the same problems are resampled
together (bootstrap over problems), which is much tighter than comparing two separate intervals.

Files written to `out_dir`: compare.md (tables, one section per group), vs_sparsity.png (metrics vs sparsity
per calibration; vs_sparsity-<group>.png each when there are several groups).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from rac.data.segments import DEFAULT_SEGMENT_WEIGHTS, weights_tag
from rac.reporting.numbers import fmt
from rac.store.artifacts import atomic_path, atomic_write_text
from rac.store.index import Index

PANELS = (("accuracy", "accuracy (pass@1, 95% CI)"), ("mean_tokens", "mean CoT tokens"),
          ("runaway_share", "runaway share (hit the cap)"), ("nll_gap", "NLL gap on dense CoTs [nats/token]"),
          ("top1_agreement", "top-1 agreement with dense"), ("recon_decode", "rel. recon. error, decode tokens"))


@dataclass(frozen=True)
class Cell:
    """One model of the grid (dense: calibration None) with everything measured about it."""

    label: str
    eval_key: str
    calibration: str | None
    method: str | None
    setting: str  # "50%", "2:4", "50% owl", "50% p1d3" (segment weights other than the default), "dense"
    sparsity: float
    eval: dict[str, Any]
    proxies: dict[str, Any] | None
    per_problem: dict[str, float]  # prompt_id -> pass rate over its samples
    prune_s: float | None
    per_problem_runaway: dict[str, float] = field(default_factory=dict)  # prompt_id -> share hitting the cap
    problem_group: dict[str, str] = field(default_factory=dict)  # prompt_id -> original problem (variants)
    group: str = ""  # base model and eval set, e.g. "qwen2.5-coder-0.5b, eval gsm8k (eval half), greedy, 512 tok"
    group_slug: str = ""  # the group in file names

    def proxy_metrics(self) -> dict[str, Any]:
        """The full proxies summary (per-sequence sums, intervals), empty when there are no proxies."""
        m = self.proxies.get("metrics") if self.proxies else None
        return dict(json.loads(m) if isinstance(m, str) else m or {})

    def get(self, key: str) -> float | None:
        """A metric by name from the eval row, then the proxies row."""
        for src in (self.eval, self.proxies or {}):
            if src.get(key) is not None:
                return float(src[key])
        return None


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                      level: float = 0.95, groups: np.ndarray | None = None) -> tuple[float, float, float]:
    """(mean(a - b), low, high): percentile bootstrap over problems of per-problem scores a[i], b[i] (over
    clusters of problems, e.g. template variants of one GSM8K problem, when `groups` gives each one's id)."""
    from rac.eval.evaluate import bootstrap_means

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired scores need two equal non-empty 1-D arrays, got shapes {a.shape} and {b.shape}")
    d = a - b  # [P]
    means = bootstrap_means(d, n_boot, seed, groups)  # [B]
    tail = (1.0 - level) / 2.0
    return float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def _setting(row: dict[str, Any]) -> str:
    if row["calibration"] is None:
        return "dense"
    cfg = row.get("prune_cfg") or {}
    nm = cfg.get("nm")
    setting = f"{nm[0]}:{nm[1]}" if nm else f"{round(float(row['sparsity'] or 0.0) * 100)}%"
    kind = (cfg.get("allocation") or {}).get("kind", "uniform")
    weights = row.get("segment_weights") or DEFAULT_SEGMENT_WEIGHTS  # the prune stage's CompressConfig field
    return " ".join([setting] + ([kind] if kind != "uniform" else [])
                    + ([weights_tag(weights)] if weights != DEFAULT_SEGMENT_WEIGHTS else []))


# eval settings that do not change what is measured (batching, grading threads, interval resamples)
_NOT_RESULT = {"shard_size", "batch_size", "kv_cache_gib", "grade_threads", "bootstrap"}


def _strip(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in _NOT_RESULT}
    return d


@dataclass(frozen=True)
class EvalGroup:
    """A base model and an evaluation set: cells of one group are compared with each other."""

    model: str
    title: str  # "<model>, eval <set>, <sampling>, <cap> new tokens [<digest>]"
    slug: str  # file-name part: "<model>-<digest>"


def eval_group(config: dict[str, Any]) -> EvalGroup:
    """The group of a run config: its base model and the result-defining settings of its eval section."""
    model = Path(str(config.get("model", "?"))).name
    ev = _strip(config.get("eval") or {})
    digest = hashlib.sha256(json.dumps(ev, sort_keys=True, default=str).encode()).hexdigest()[:6]
    pr, gen = ev.get("prompts") or {}, ev.get("generation") or {}
    what = str(pr.get("source", "?")) + (f" ({pr['holdout']} half)" if pr.get("holdout") else "")
    if int(pr.get("variants") or 1) > 1:
        what += f" x{pr['variants']} variants" + (" + original" if pr.get("keep_original") else "")
    temp = gen.get("temperature")
    sampling = "greedy" if temp == 0 else f"T={temp}, {gen.get('samples_per_prompt', 1)} sample(s)/problem"
    title = f"{model}, eval {what}, {sampling}, {gen.get('max_new_tokens')} new tokens [{digest}]"
    return EvalGroup(model, title, re.sub(r"[^A-Za-z0-9._-]+", "-", model) + f"-{digest}")


def _newest(rows: Iterable[dict[str, Any]], groups: dict[str, EvalGroup]) -> dict[tuple[EvalGroup, str], dict[str, Any]]:
    """The newest row of each (group, label); rows of runs without a group are skipped."""
    out: dict[tuple[EvalGroup, str], dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["created"]):
        if r["run_id"] in groups:
            out[(groups[r["run_id"]], r["label"])] = r
    return out


def problem_groups(index: Index) -> dict[str, str]:
    """prompt id -> group id (the problem a template variant comes from) over the prompts of the work dir."""
    try:
        _, rows = index.query("SELECT DISTINCT prompt_id, group_id FROM prompts")
    except duckdb.CatalogException:  # no prompts Parquet in the work dir: every problem is its own group
        return {}
    return {str(p): str(g) for p, g in rows}


def collect_cells(work_dir: Path | str) -> list[Cell]:
    """Every model of the work dir (evaluated, or with proxies only), the newest record of each label per
    base model and eval set, joined with its proxies and prune time."""
    index = Index(work_dir)
    _, runs = index.query("SELECT run_id, config FROM runs")
    groups = {run: eval_group(json.loads(c) if isinstance(c, str) else dict(c or {})) for run, c in runs}
    cols, rows = index.query("SELECT * FROM evals")
    evals = _newest((dict(zip(cols, r, strict=True)) for r in rows), groups)
    cols, rows = index.query("SELECT * FROM proxies")
    proxies = _newest((dict(zip(cols, r, strict=True)) for r in rows), groups)
    _, stages = index.query("SELECT run_id, name, config, seconds FROM stages WHERE stage = 'prune' "
                            "AND status = 'done' AND NOT reused")
    prune: dict[tuple[str, str], tuple[dict[str, Any], float | None]] = {}  # (base model, label) -> (prune config, seconds)
    for run, name, c, s in stages:
        if run in groups:
            prune[(groups[run].model, name.split("/", 1)[1])] = ((json.loads(c) if isinstance(c, str) else c), s)
    cells = []
    problem_group = problem_groups(index)
    for group, label in sorted({*proxies, *evals}, key=lambda k: (k[0].title, k[1])):  # evaluated, or proxies only
        e, pr = evals.get((group, label)), proxies.get((group, label))
        src: dict[str, Any] = e or pr or {}
        cfg, secs = prune.get((group.model, label), ({}, None))
        row = {"calibration": src["calibration"], "sparsity": src["sparsity"] or 0.0, "prune_cfg": cfg.get("prune"),
               "segment_weights": cfg.get("segment_weights")}
        per: list[tuple[Any, ...]] = []
        pgroup: dict[str, str] = {}
        if e is not None:
            _, per = index.query("SELECT prompt_id, avg(correct::DOUBLE), avg((finish_reason = 'length')::DOUBLE) "
                                 "FROM eval_rows WHERE stage_key = ? GROUP BY prompt_id", [e["stage_key"]])
            pgroup = {str(p): problem_group[str(p)] for p, *_ in per if str(p) in problem_group}
        m = (json.loads(e["metrics"]) if isinstance(e["metrics"], str) else dict(e["metrics"] or {})) if e else {}
        cells.append(Cell(label, e["stage_key"] if e else "", src["calibration"], src["method"], _setting(row),
                          float(src["sparsity"] or 0.0), m, pr, {str(p): float(v) for p, v, _ in per}, secs,
                          {str(p): float(x) for p, _, x in per}, pgroup, group.title, group.slug))
    return sorted(cells, key=lambda c: (c.group, c.method or "", c.setting, c.calibration or ""))


def paired_rows(cells: list[Cell], treat: str, base: str, n_boot: int = 10_000) -> list[dict[str, Any]]:
    """Differences calibration treat - base (paired over shared problems and CoTs) at every setting both have."""
    by = {(c.method, c.setting, c.calibration): c for c in cells}
    out = []
    for (method, setting, calib), t in sorted(by.items(), key=lambda kv: str(kv[0])):
        b = by.get((method, setting, base))
        if calib == treat and b is not None:
            row = paired_cells(t, b, n_boot)
            if row is not None:
                out.append({**row, "treat": treat, "base": base})
    return out


def paired_cells(t: Cell, b: Cell, n_boot: int = 10_000) -> dict[str, Any] | None:
    """Model t - model b: accuracy and runaway paired over their shared problems (resampling problem groups),
    NLL gap and top-1 over the same dense CoTs; None when nothing was measured on both."""
    shared = sorted(set(t.per_problem) & set(b.per_problem))
    setting = t.setting if t.setting == b.setting else f"{t.setting} vs {b.setting}"
    row: dict[str, Any] = {"method": t.method, "setting": setting, "treat": t.label, "base": b.label,
                           "n": len(shared), **paired_proxies(t, b, n_boot)}
    groups = np.array([t.problem_group.get(p, p) for p in shared])  # [P] variants of a problem move together
    row["groups"] = len(set(groups.tolist()))
    for name, get in (("accuracy", lambda c, p: c.per_problem[p]), ("runaway", lambda c, p: c.per_problem_runaway[p])):
        if shared:
            d, lo, hi = paired_difference(np.array([get(t, p) for p in shared]),
                                          np.array([get(b, p) for p in shared]), n_boot, groups=groups)
            row.update({f"{name}_diff": d, f"{name}_low": lo, f"{name}_high": hi})
    return row if len(row) > 6 else None  # something was measured on both


def label_pairs(cells: list[Cell], pairs: tuple[tuple[str, str], ...],
                n_boot: int = 10_000) -> dict[str, list[dict[str, Any]]]:
    """Per group, model A - model B for every requested (A, B) of model labels both in that group; a label that
    is in no group of the work dir raises ValueError naming it."""
    known = {c.label for c in cells}
    for a, b in pairs:
        for lab in (a, b):
            if lab not in known:
                raise ValueError(f"--pair {a}:{b}: no model {lab!r} in the work dir; known: {sorted(known)}")
    by_group: dict[str, dict[str, Cell]] = {}
    for c in cells:
        by_group.setdefault(c.group, {})[c.label] = c
    out: dict[str, list[dict[str, Any]]] = {}
    for group, by in by_group.items():
        rows = [paired_cells(by[a], by[b], n_boot) if a in by and b in by else None for a, b in pairs]
        out[group] = [r for r in rows if r is not None]
    return out


def _per_sequence(c: Cell) -> tuple[list[str], dict[str, np.ndarray]] | None:
    m = c.proxy_metrics()
    if not m.get("per_sequence"):
        return None
    return list(m["cot_ids"]), {k: np.asarray(v, dtype=np.float64) for k, v in m["per_sequence"].items()}


def paired_proxies(t: Cell, b: Cell, n_boot: int = 10_000) -> dict[str, float]:
    """NLL-gap and top-1 differences t - b on the same dense CoTs, with bootstrap intervals over sequences
    (empty when either model lacks per-sequence proxies or they scored different CoTs)."""
    from rac.eval.proxies import ratio_interval

    pt, pb = _per_sequence(t), _per_sequence(b)
    if pt is None or pb is None or pt[0] != pb[0] or not np.array_equal(pt[1]["n"], pb[1]["n"]):
        return {}
    n = pt[1]["n"]
    keep = n > 0
    out: dict[str, float] = {}
    for name, key in (("nll_gap", "pruned_nll"), ("top1", "agree")):
        d = pt[1][key] - pb[1][key]  # [S] (the dense NLL cancels in the gap difference)
        lo, hi = ratio_interval(d[keep], n[keep], n_boot)
        out.update({f"{name}_diff": float(d.sum() / n.sum()), f"{name}_low": lo, f"{name}_high": hi})
    return out


def cells_table(cells: list[Cell]) -> str:
    """Markdown: one row per model with accuracy, length, runaway, time and proxies."""
    lines = ["| model | method | setting | calib | accuracy [95% CI] | mean tok | p90 tok | runaway | eval s "
             "| prune s | NLL gap | top-1 agree | KL | recon prompt | recon decode |", "|" + "---|" * 15]
    for c in cells:
        e = c.eval
        acc = f"{fmt(c.get('accuracy'))} [{fmt(e.get('ci_low'))}, {fmt(e.get('ci_high'))}]" if e else "not evaluated"
        lines.append(
            f"| {c.label} | {c.method or '-'} | {c.setting} | {c.calibration or '-'} | {acc} "
            f"| {fmt(c.get('mean_tokens'), 1)} | {fmt(c.get('p90_tokens'), 0)} | {fmt(c.get('runaway_share'))} "
            f"| {fmt(c.get('wall_s'), 0)} | {fmt(c.prune_s, 0)} | {fmt(c.get('nll_gap'), 4)}{_ci(c, 'nll_gap')} "
            f"| {fmt(c.get('top1_agreement'), 4)} | {fmt(c.get('kl'), 4)} | {fmt(c.get('recon_prompt'), 4)} "
            f"| {fmt(c.get('recon_decode'), 4)} |")
    return "\n".join(lines)


def _diff(r: dict[str, Any], name: str, d: int = 3) -> str:
    if f"{name}_diff" not in r:
        return "-"
    v, lo, hi = r[f"{name}_diff"], r[f"{name}_low"], r[f"{name}_high"]
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{v:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]{mark}"


def _ci(c: Cell, key: str) -> str:
    ci = interval(c, key)
    return f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci is not None else ""


def paired_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: paired differences (accuracy and runaway share over problems; NLL gap and top-1 over dense CoTs) with their
    95% intervals; * marks an interval that excludes 0."""
    lines = ["| method | setting | difference | problems | accuracy diff [95% CI] | runaway diff [95% CI] "
             "| NLL gap diff [95% CI] | top-1 diff [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['treat']} - {r['base']} | {_n(r)} "
                     f"| {_diff(r, 'accuracy')} | {_diff(r, 'runaway')} | {_diff(r, 'nll_gap', 4)} | {_diff(r, 'top1', 4)} |")
    return "\n".join(lines)


def _n(r: dict[str, Any]) -> str:
    g = r.get("groups", r["n"])
    return f"{r['n']} ({g} groups)" if g < r["n"] else str(r["n"])


def interval(c: Cell, key: str) -> tuple[float, float] | None:
    """The 95% interval of metric `key` of a cell, when one was measured (accuracy, NLL gap, top-1)."""
    if key == "accuracy":
        lo, hi = c.eval.get("ci_low"), c.eval.get("ci_high")
        return (float(lo), float(hi)) if lo is not None and hi is not None else None
    ci = c.proxy_metrics().get({"nll_gap": "nll_gap_ci", "top1_agreement": "top1_ci", "kl": "kl_ci"}.get(key, ""))
    return (float(ci[0]), float(ci[1])) if ci and None not in ci else None


def plot_vs_sparsity(cells: list[Cell], out: Path, method: str = "sparsegpt") -> Path:
    """2x3 panels of PANELS vs unstructured sparsity, one line per calibration (95% intervals where
    measured); dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((c for c in cells if c.calibration is None), None)
    calibs = sorted({c.calibration for c in cells if c.calibration is not None})
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for i, cal in enumerate(calibs):
            pts = sorted((c for c in cells if c.calibration == cal and c.method == method
                          and c.setting.endswith("%") and c.get(key) is not None), key=lambda c: c.sparsity)
            if not pts:
                continue
            xs = [c.sparsity for c in pts]
            ys = [float(c.get(key) or 0.0) for c in pts]
            cis = [interval(c, key) for c in pts]
            if all(ci is not None for ci in cis):
                err = [[y - ci[0] for ci, y in zip(cis, ys, strict=True) if ci is not None],
                       [ci[1] - y for ci, y in zip(cis, ys, strict=True) if ci is not None]]
                ax.errorbar([x + 0.004 * (i - 1) for x in xs], ys, yerr=err, marker="o", capsize=3, label=cal)
            else:
                ax.plot(xs, ys, marker="o", label=cal)
        if dense is not None and dense.get(key) is not None:
            ax.axhline(float(dense.get(key) or 0.0), color="0.4", ls="--", label="dense")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{method} sparsity")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def write_comparison(work_dir: Path | str, out_dir: Path | str, treat: str = "rac",
                     bases: tuple[str, ...] = ("prompt", "generic"),
                     pairs: tuple[tuple[str, str], ...] = ()) -> list[Path]:
    """compare.md + vs_sparsity.png for every evaluated model of a work dir, plus the differences of the
    requested (A, B) model `pairs` (e.g. OWL vs uniform); returns the written paths."""
    cells = collect_cells(work_dir)
    if not cells:
        raise ValueError(f"no evaluated models in the index of {work_dir}: run a config with an `eval` section")
    chosen = label_pairs(cells, pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.group, []).append(c)
    md, plots = [], []
    for group, members in groups.items():
        name = "vs_sparsity.png" if len(groups) == 1 else f"vs_sparsity-{members[0].group_slug}.png"
        paired = [r for base in bases for r in paired_rows(members, treat, base)]
        md += [f"# {group}", "", "## Every model", "", cells_table(members), "",
               f"## Paired differences ({treat} vs others)", "",
               paired_table(paired) if paired else "(no setting evaluated with both)", ""]
        if chosen[group]:
            md += ["## Paired differences (chosen models)", "", paired_table(chosen[group]), ""]
        md += [f"![vs sparsity]({name})", ""]
        plots.append(plot_vs_sparsity(members, out / name))
    return [atomic_write_text(out / "compare.md", "\n".join(md)), *plots]
