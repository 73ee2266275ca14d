"""The `prune:` list of a run config: its entries and the jobs they make (a calibration x an entry).

An entry is a rac.pruners PruneConfig plus two optional run-level keys (docs/decode-share.md):

    prune:
      - {method: sparsegpt, sparsity: 0.5}                     # every calibration, compress.segment_weights
      - {method: sparsegpt, sparsity: 0.5, segment_weights: {prompt: 1, decode: 3}, calibrations: [rac]}

`segment_weights` replaces `compress.segment_weights` for the entry's jobs (checked as it is,
`rac.data.segments.check_segment_weights`: a segment left out weighs 0). It is the job's
`CompressConfig.segment_weights`, so the prune stage key holds the weights the engine uses and an entry
without it keeps its key. Its label gets `-<weights_tag>` (`rac-sparsegpt-50pct-p1d3`).
`calibrations` names the calibrations the entry prunes with (default: all, in the order of `calibrations:`).
Every job's weights must give some segment its calibration kind holds (`KIND_SEGMENTS`) a weight > 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from rac.data.calib import KIND_SEGMENTS, CalibConfig
from rac.data.segments import check_segment_weights, weights_tag
from rac.engine.sequential import CompressConfig
from rac.pruners.base import PruneConfig
from rac.runs.sections import build_section

ENTRY_KEYS = ("calibrations", "segment_weights")  # the run-level keys of a prune entry
_WEIGHTS = TypeAdapter(dict[str, float])


@dataclass(frozen=True)
class PruneJob:
    """One pruned model of the grid: a calibration set x a compression config."""

    label: str
    calibration: str
    compress: CompressConfig


@dataclass(frozen=True)
class PruneEntry:
    """One item of `prune:`: the pruner config, its weights override and the calibrations it applies to."""

    prune: PruneConfig
    segment_weights: dict[str, float] | None = None  # None: compress.segment_weights
    calibrations: tuple[str, ...] | None = None  # None: every calibration

    def canonical(self) -> dict[str, Any]:
        """The PruneConfig's canonical dict, plus the run-level keys that are set (so plain entries are unchanged)."""
        extra: dict[str, Any] = {}
        if self.segment_weights is not None:
            extra["segment_weights"] = dict(self.segment_weights)
        if self.calibrations is not None:
            extra["calibrations"] = list(self.calibrations)
        return {**self.prune.canonical(), **extra}


@dataclass(frozen=True)
class JobGrid:
    """The parsed `prune:` list: the jobs, the entries they came from and the `compress` section's canonical dict."""

    jobs: tuple[PruneJob, ...]
    entries: tuple[PruneEntry, ...]
    compress: dict[str, Any]


def prune_label(calib: str, prune: PruneConfig, progressive: bool = False,
                segment_weights: Mapping[str, float] | None = None) -> str:
    """E.g. ``rac-sparsegpt-50pct``, ``rac-sparsegpt-2of4-w4g128`` (joint), ``rac-gptq-w4g128`` (quantized only),
    ``rac-sparsegpt-50pct-owl`` (OWL layer sparsities), ``rac-sparsegpt-50pct-p1d3`` (the entry's segment weights);
    a progressive calibration adds ``-progressive`` unless its name already says so (``rac-progressive-...``)."""
    amount = f"{prune.nm[0]}of{prune.nm[1]}" if prune.nm else f"{round(float(prune.sparsity or 0.0) * 100):d}pct"
    parts = [calib, prune.method] + ([amount] if prune.method != "gptq" else [])
    parts += [prune.quant.label] if prune.quant is not None else []
    parts += [prune.allocation.label] if prune.allocation.label else []  # e.g. owl (uniform: nothing)
    parts += [weights_tag(segment_weights)] if segment_weights is not None else []
    return "-".join(parts + (["progressive"] if progressive and "progressive" not in calib else []))


def parse_jobs(data: Mapping[str, Any], calibs: dict[str, CalibConfig], problems: list[str]) -> JobGrid:
    """Every prune entry x every calibration it names, each with the one `compress` section (checked once) and
    the entry's weights override; problems appended to `problems` (an empty grid when nothing is usable)."""
    empty = JobGrid((), (), {})
    raw_prunes = data.get("prune", [])
    if isinstance(raw_prunes, Mapping):
        raw_prunes = [raw_prunes]
    if not isinstance(raw_prunes, list) or ("prune" in data and not raw_prunes):
        problems.append(f"prune = {raw_prunes!r}: expected a non-empty list of prune configs")
        return empty
    compress = data.get("compress") or {}
    if not isinstance(compress, Mapping):
        problems.append(f"compress: expected a mapping of keys, got {compress!r}")
        return empty
    if "prune" in compress:
        problems.append("compress.prune: give pruning settings in the top-level `prune` list instead")
        return empty
    entries = [_parse_entry(i, pdata, calibs, problems) for i, pdata in enumerate(raw_prunes)]
    valid = [e for e in entries if e is not None]
    if not valid:
        return empty
    n_before = len(problems)
    first = build_section(CompressConfig, compress, "compress", problems, drop=("prune",),
                          extra={"prune": valid[0].prune})
    if first is None or len(problems) > n_before:
        return empty
    jobs = [job for i, e in enumerate(entries) if e is not None for job in _entry_jobs(i, e, first, calibs, problems)]
    labels = [j.label for j in jobs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        problems.append(f"prune: duplicate entries {dupes}")
    section = first.canonical()
    section.pop("prune", None)
    return JobGrid(tuple(jobs), tuple(valid), section)


def _parse_entry(i: int, pdata: Any, calibs: dict[str, CalibConfig], problems: list[str]) -> PruneEntry | None:
    where, n_before = f"prune[{i}]", len(problems)
    extra = {k: pdata[k] for k in ENTRY_KEYS if k in pdata} if isinstance(pdata, Mapping) else {}
    if isinstance(pdata, Mapping):
        pdata = {k: v for k, v in pdata.items() if k not in ENTRY_KEYS}
    prune = build_section(PruneConfig, pdata, where, problems, also=ENTRY_KEYS)
    weights = _entry_weights(where, extra["segment_weights"], problems) if "segment_weights" in extra else None
    names = _entry_calibrations(where, extra["calibrations"], calibs, problems) if "calibrations" in extra else None
    if prune is None or len(problems) > n_before:
        return None
    return PruneEntry(prune, weights, names)


def _entry_weights(where: str, raw: Any, problems: list[str]) -> dict[str, float] | None:
    """The override, checked exactly as compress.segment_weights (one problem line when it is bad)."""
    try:
        return check_segment_weights(_WEIGHTS.validate_python(raw))
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in (where, "segment_weights", *e["loc"]))
        problems.append(f"{loc} = {e.get('input')!r}: {e['msg']}")
    except ValueError as err:
        problems.append(f"{where}.segment_weights = {raw!r}: {err}")
    return None


def _entry_calibrations(where: str, raw: Any, calibs: dict[str, CalibConfig],
                        problems: list[str]) -> tuple[str, ...] | None:
    """The calibrations an entry applies to, in the order of `calibrations:` (None: all of them)."""
    if not isinstance(raw, list) or not raw or not all(isinstance(n, str) for n in raw) or len(set(raw)) < len(raw):
        problems.append(f"{where}.calibrations = {raw!r}: expected a non-empty list of distinct calibration names")
        return None
    unknown = [n for n in raw if n not in calibs]
    if unknown:
        problems.append(f"{where}.calibrations: unknown calibration(s) {unknown}; the calibrations are {list(calibs)}")
        return None
    return None if set(raw) == set(calibs) else tuple(n for n in calibs if n in raw)


def _entry_jobs(i: int, entry: PruneEntry, first: CompressConfig, calibs: dict[str, CalibConfig],
                problems: list[str]) -> list[PruneJob]:
    """The jobs of one entry: its calibrations, each checked against the progressive chain and the weights."""
    p = entry.prune
    update: dict[str, Any] = {"prune": p}
    if entry.segment_weights is not None:
        update["segment_weights"] = entry.segment_weights  # validated floats: equal to a validated construction
    cfg = first.model_copy(update=update)
    jobs = []
    for cname in entry.calibrations or tuple(calibs):
        calib = calibs[cname]
        label = prune_label(cname, p, calib.progressive is not None, entry.segment_weights)
        chain = calib.progressive
        why = chain.refuses(p.method, p.sparsity) if chain is not None else None
        if chain is not None and why is not None:
            problems.append(f"calibrations.{cname}.progressive.steps = {list(chain.steps)} with prune[{i}] "
                            f"({label}): {why}")
        held = KIND_SEGMENTS[calib.kind]
        if not any(cfg.segment_weights.get(s, 0.0) > 0 for s in held):
            whose = f"prune[{i}].segment_weights" if entry.segment_weights is not None else "compress.segment_weights"
            problems.append(f"{whose} = {cfg.segment_weights} with calibrations.{cname} ({label}): a {calib.kind!r} "
                            f"set holds only {list(held)} tokens and these weigh 0; give one a weight > 0 or leave "
                            f"{cname} out of prune[{i}].calibrations")
        jobs.append(PruneJob(label, cname, cfg))
    return jobs
