"""A run's pruned models: list them (`pruned_models`) and export one as a self-contained Hugging Face folder
with a model card (`export_model`).

Everything is read from the index: the run's `stages` rows of stage `prune` and status `done` (their `model`
output artifact is the folder `stages/prune/<stage_key>/model/`), the calibration stage's summary
(`rac.data.calib.CalibSummary` fields), the `layers`, `evals` and `proxies` rows of the run.

An export is a copy of the pruned folder (HF config, tokenizer, safetensors shards, `rac_provenance.json`
unchanged) plus `README.md`, a model card with YAML front matter; it is written into a temp folder beside
`dest` and renamed into place (`rac.store.artifacts.atomic_dir`). The copy is hashed while it is written and
must give the sha256 the index recorded for the folder.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import rac
from rac.data.segments import DEFAULT_SEGMENT_WEIGHTS, weights_tag
from rac.reporting.numbers import fmt
from rac.store.artifacts import ArtifactError, ArtifactRef, atomic_dir, sha256_tree
from rac.store.index import Index

CARD_NAME = "README.md"
PROVENANCE_NAME = "rac_provenance.json"  # rac.engine.output.PROVENANCE_NAME (rac.reporting may not import it)


@dataclass(frozen=True)
class PrunedModel:
    """One finished prune step of a run and its HF folder."""

    label: str  # the prune job's label, `<calibration>-<method>-<setting>` (stage name `prune/<label>`)
    calibration: str | None
    method: str | None
    sparsity: float | None  # target share of zeros (N:M: 1 - N/M)
    nm: tuple[int, int] | None  # N:M pattern, None when unstructured
    stage_key: str
    folder: Path
    ref: ArtifactRef  # the recorded `model` artifact (uri + sha256)
    verified: bool | None  # the folder matches its recorded sha256; None: not checked
    problem: str | None = None  # why it does not verify
    segment_weights: dict[str, float] | None = None  # the prune stage's H weights (None: not recorded)

    @property
    def setting(self) -> str:
        """`2:4` for N:M, else the target sparsity in percent (`50%`); segment weights other than the default
        follow as their tag (`50% p1d3`, `rac.data.segments.weights_tag`)."""
        if self.nm is not None:
            amount = f"{self.nm[0]}:{self.nm[1]}"
        else:
            amount = "-" if self.sparsity is None else f"{100 * self.sparsity:g}%"
        w = self.segment_weights
        return amount if w is None or w == DEFAULT_SEGMENT_WEIGHTS else f"{amount} {weights_tag(w)}"


def _run_row(index: Index, run_id: str) -> dict[str, Any]:
    run = index.get_run(run_id)
    if run is None:
        known = [r["run_id"] for r in index.list_runs()]
        raise ValueError(f"no run {run_id!r} in {index.path}; known runs: {known}")
    return run


def _done_row(index: Index, run_id: str, stage_key: str) -> dict[str, Any] | None:
    """The done stage row of `stage_key`, this run's when it has one (outputs decoded)."""
    rows = index.done_stages(stage_key)
    mine = [r for r in rows if r["run_id"] == run_id]
    pick = mine or rows
    return pick[0] if pick else None


def pruned_models(work_dir: Path | str, run_id: str, verify: bool = True) -> list[PrunedModel]:
    """The finished pruned models of a run, in stage order; `verify` re-hashes each folder
    (`ArtifactRef.check`), else `verified` is None. Unknown run: ValueError listing the known ones."""
    index = Index(work_dir)
    _run_row(index, run_id)
    out: list[PrunedModel] = []
    for s in index.run_stages(run_id):
        if s["stage"] != "prune" or s["status"] != "done":
            continue
        row = _done_row(index, run_id, s["stage_key"])
        refs = [r for r in (row["outputs"] if row else []) if r.kind == "model"]
        if not refs:
            continue
        config = json.loads(row["config"]) if row and row.get("config") else {}
        prune = config.get("prune") or {}
        summary = row["summary"] if row else {}
        nm = prune.get("nm")
        problem = refs[0].check() if verify else None
        out.append(PrunedModel(
            label=s["name"].split("/", 1)[-1],
            calibration=summary.get("calibration"),
            method=prune.get("method", summary.get("method")),
            sparsity=prune.get("sparsity", summary.get("sparsity")),
            nm=(int(nm[0]), int(nm[1])) if nm else None,
            stage_key=s["stage_key"],
            folder=refs[0].path,
            ref=refs[0],
            verified=(problem is None) if verify else None,
            problem=problem,
            segment_weights=config.get("segment_weights"),
        ))
    return out


def _weights(w: dict[str, float] | None) -> str:
    """The H segment weights for the model card (`prompt 1, decode 3`; `-` when not recorded)."""
    return ", ".join(f"{k} {v:g}" for k, v in w.items()) if w else "-"


def export_command(work_dir: Path | str, run_id: str, label: str, dest: str = "DEST") -> str:
    """The `rac export` command line for one pruned model."""
    return f"rac --work-dir {Path(work_dir).resolve()} export {run_id} {label} {dest}"


def run_command(work_dir: Path | str, run: dict[str, Any]) -> str:
    """The command that produced a run (its recorded config path and run id)."""
    path = run.get("config_path") or "<config path not recorded>"
    return f"rac --work-dir {Path(work_dir).resolve()} run {path} --run-id {run['run_id']}"


# ------------------------------------------------------------------ numbers for the card
def safetensors_numels(folder: Path) -> dict[str, int]:
    """Tensor name -> element count, from the headers of the folder's safetensors files (no data read)."""
    from rac.models.streaming import WeightFiles

    return {name: math.prod(shape) for name, (_, shape) in WeightFiles(Path(folder)).specs.items()}


def achieved_sparsity(layer_rows: list[dict[str, Any]], numels: dict[str, int]) -> float | None:
    """Share of zeros over all pruned linears: the `layers` rows' sparsity weighted by the weight's size
    (`<linear>.weight` in `numels`); the plain mean over linears when a size is unknown. None: no rows."""
    if not layer_rows:
        return None
    sizes = [numels.get(f"{r['linear']}.weight") for r in layer_rows]
    if all(s for s in sizes):
        total = sum(s for s in sizes if s)
        return sum(float(r["sparsity"]) * s for r, s in zip(layer_rows, sizes, strict=True) if s) / total
    return sum(float(r["sparsity"]) for r in layer_rows) / len(layer_rows)


def _calib_summary(index: Index, run_id: str, calibration: str | None) -> dict[str, Any]:
    """The `build_calibration` summary (CalibSummary fields) of the run's calibration stage `calib/<name>`."""
    for s in index.run_stages(run_id):
        if s["stage"] == "calib" and s["status"] == "done" and s["name"] == f"calib/{calibration}":
            row = _done_row(index, run_id, s["stage_key"])
            return dict(row["summary"]) if row else {}
    return {}


def _f(x: Any, digits: int = 4) -> str:
    return fmt(x, digits)  # the card shows 4 decimals


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("metrics")
    if isinstance(raw, str):
        try:
            return dict(json.loads(raw))
        except (json.JSONDecodeError, TypeError):
            return {}
    return dict(raw or {})


def _ci(values: Any, digits: int = 4) -> str:
    if isinstance(values, list | tuple) and len(values) == 2 and None not in values:
        return f"[{_f(values[0], digits)}, {_f(values[1], digits)}]"
    return "-"


def model_card(work_dir: Path | str, run_id: str, model: PrunedModel) -> str:
    """The README.md model card of one pruned model of a run (YAML front matter + Markdown body)."""
    index = Index(work_dir)
    run = _run_row(index, run_id)
    base = str(run["config"].get("model") or run["fingerprint"].get("model_dir") or "unknown")
    base_dir = run["fingerprint"].get("model_dir") or "-"
    method = model.method or "unknown"
    front = {"base_model": base, "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["pruned", "sparse", "rac", method]}
    rows = index.layer_rows(model.stage_key)
    achieved = achieved_sparsity(rows, safetensors_numels(model.folder))
    calib = _calib_summary(index, run_id, model.calibration)
    n_tokens = calib.get("n_tokens")
    pattern = f"N:M {model.nm[0]}:{model.nm[1]}" if model.nm else "unstructured"
    md = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
          f"# {model.label}: `{base}` pruned with rac", "",
          f"`{base}` pruned one-shot by rac ({method}, {pattern}, target sparsity "
          f"{_f(model.sparsity)}), calibrated on the `{model.calibration}` calibration set of run `{run_id}`.", "",
          "## Model", "", "| field | value |", "|---|---|",
          f"| base model | `{base}` |",
          f"| base model folder | `{base_dir}` |",
          f"| base model revision | `{run['fingerprint'].get('model_revision') or '-'}` |",
          f"| method | {method} |",
          f"| pattern | {pattern} |",
          f"| target sparsity | {_f(model.sparsity)} |",
          f"| achieved sparsity | {_f(achieved)} |",
          f"| pruned linears | {len(rows)} |",
          f"| calibration | {model.calibration or '-'} |",
          f"| segment weights | {_weights(model.segment_weights)} |",
          f"| rac version | {rac.__version__} |",
          f"| run | `{run_id}` |",
          f"| prune stage_key | `{model.stage_key}` |",
          f"| model folder sha256 | `{model.ref.sha256}` |", "",
          "Achieved sparsity: share of exact zeros over the weights of all pruned linears (the index `layers` "
          "rows' `sparsity`, weighted by each weight's size).", ""]
    md += ["## Calibration", "",
           f"Kind `{calib.get('kind', '-')}`: {calib.get('n_seqs', '-')} sequences, `n_tokens` {n_tokens if n_tokens is not None else '-'} "
           "(the calibration stage's summary in the index).", "",
           "| segment | tokens | share | field |", "|---|---|---|---|"]
    for seg in ("prompt", "decode", "other"):
        share = calib.get(f"{seg}_share")
        count = "-" if share is None or n_tokens is None else str(round(float(share) * int(n_tokens)))
        md.append(f"| {seg} | {count} | {_f(share)} | `{seg}_share` |")
    md.append("")
    evals = {e["label"]: e for e in index.evals(run_id)}
    shown = [evals[k] for k in (model.label, "dense") if k in evals]
    if shown:
        md += ["## Evaluation", "",
               "pass@1 accuracy with its 95% bootstrap interval, mean CoT length, share of samples that hit the "
               "token cap (`evals` rows of the run).", "",
               "| model | problems | accuracy | 95% CI | mean CoT tokens | runaway share |", "|---|---|---|---|---|---|"]
        md += [f"| {e['label']} | {e['n_problems']} | {_f(e['accuracy'])} | [{_f(e['ci_low'])}, {_f(e['ci_high'])}] "
               f"| {_f(e['mean_tokens'], 1)} | {_f(e['runaway_share'])} |" for e in shown]
        md.append("")
    proxies = [p for p in index.proxies(run_id) if p["label"] == model.label]
    if proxies:
        p, m = proxies[0], _metrics(proxies[0])
        md += ["## Forward-pass proxies", "",
               "On the dense model's own held-out evaluation CoTs, per CoT token (`proxies` row of the run).", "",
               "| nll_gap | nll_gap 95% CI | top1_agreement | top1 95% CI | kl | dense_nll | pruned_nll | positions |",
               "|---|---|---|---|---|---|---|---|",
               f"| {_f(p['nll_gap'])} | {_ci(m.get('nll_gap_ci'))} | {_f(p['top1_agreement'])} | {_ci(m.get('top1_ci'))} "
               f"| {_f(p['kl'], 6)} | {_f(p['dense_nll'])} | {_f(p['pruned_nll'])} | {p['n_positions']} |", ""]
    md += ["## Storage", "",
           "The weights are stored dense: pruned weights are exact zeros in ordinary safetensors shards, so the "
           "folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and serves at dense speed "
           "(no sparse kernels are involved; the size on disk is the dense model's).", "",
           "## Provenance", "",
           f"Produced by rac {run['fingerprint'].get('rac_version') or rac.__version__} with:", "",
           "```", run_command(work_dir, run), "```", "",
           f"`{PROVENANCE_NAME}` (in this folder) records the versions, every stage config, the calibration "
           "fingerprint and the per-linear outcomes.", ""]
    return "\n".join(md)


# ------------------------------------------------------------------ export
def _check_dest(dest: Path, source: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"export destination {dest} already exists and is not an empty folder: choose another")
    if dest == source or source in dest.parents:
        raise ValueError(f"export destination {dest} is inside the model folder {source}")


def _copy_verified(src: Path, dst: Path, ref: ArtifactRef) -> None:
    """Copy every file of `src` into `dst`; the copy must hash to what the index recorded for `src`."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    sha, _ = sha256_tree(dst, ref.patterns)
    if sha != ref.sha256:
        raise ArtifactError(f"the copy of {src} has sha256 {sha[:12]}, recorded {ref.sha256[:12]}")


def export_model(work_dir: Path | str, run_id: str, label: str, dest: Path | str) -> Path:
    """Write pruned model `label` of run `run_id` as a self-contained HF folder at `dest` (the pruned folder's
    files, `rac_provenance.json` unchanged, plus the model card README.md); returns `dest`.

    ValueError (one line) for an unknown run or label (listing the known ones), a `dest` that exists and is
    not an empty folder, and a model folder that no longer matches its recorded sha256."""
    dest = Path(dest).expanduser().resolve()
    models = {m.label: m for m in pruned_models(work_dir, run_id, verify=False)}
    if label not in models:
        raise ValueError(f"run {run_id!r} has no finished pruned model {label!r}; known labels: "
                         f"{sorted(models) or 'none'}")
    model = models[label]
    _check_dest(dest, model.folder.resolve())
    verify_hint = f"run `rac --work-dir {Path(work_dir).resolve()} verify {run_id}`"
    problem = model.ref.check()
    if problem is not None:
        raise ValueError(f"model folder {model.folder} of {label!r} does not match the index ({problem}); "
                         f"{verify_hint}")
    card = model_card(work_dir, run_id, model)
    try:
        with atomic_dir(dest) as tmp:
            _copy_verified(model.folder, tmp, model.ref)
            (tmp / CARD_NAME).write_text(card)
    except ArtifactError as err:
        raise ValueError(f"model folder {model.folder} of {label!r} changed while it was copied ({err}); "
                         f"{verify_hint}") from err
    return dest
