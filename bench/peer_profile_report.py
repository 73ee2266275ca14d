"""Reading `bench.peer_profile`'s measurements: py-spy samples -> shares, timer paths -> phases -> profile.md.

Phases: every timed call path gets its self time (inclusive minus its timed children), and the path's own
label (with its parent, for layer forwards) names its phase; phases therefore do not overlap and add up to
the whole `compress` call. `FIXES` holds the concrete fix proposed for each phase.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

PHASE_OF = {  # label of the path's own (innermost) timed function -> phase
    "HessianAccumulator.add": "statistics accumulation (H += XᵀX in the hooks)",
    "SegmentPlan.hessian": "statistics accumulation (H += XᵀX in the hooks)",
    "prune": "solver (rac.pruners.prune)",
    "read_batch": "activation store I/O", "_write_batch": "activation store I/O",
    "ActStore.read": "activation store I/O", "ActStore.write": "activation store I/O",
    "ActStore.commit": "activation store I/O", "ActStore.create": "activation store I/O",
    "ActStore.open": "activation store I/O", "ActStore.delete": "activation store I/O",
    "os.fsync": "fsync", "sha256_file": "hashing (sha256 of checkpoints / activations / calibration)",
    "_save_step": "checkpoint writes (safetensors + JSON)", "Checkpoints.save_step": "checkpoint writes (safetensors + JSON)",
    "save_file": "checkpoint writes (safetensors + JSON)", "Checkpoints.reset": "checkpoint writes (safetensors + JSON)",
    "Checkpoints.drop_acts": "checkpoint writes (safetensors + JSON)",
    "Checkpoints.load_weights": "output writing (HF folder)",
    "_trim_heap": "heap trimming + gc", "gc.collect": "heap trimming + gc", "malloc_trim": "heap trimming + gc",
    "materialize": "model loading (skeleton, layer weights, dense W per linear)",
    "release": "model loading (skeleton, layer weights, dense W per linear)",
    "WeightFiles.load": "model loading (skeleton, layer weights, dense W per linear)",
    "build_skeleton": "model loading (skeleton, layer weights, dense W per linear)",
    "load_config": "model loading (skeleton, layer weights, dense W per linear)",
    "load_done_groups": "model loading (skeleton, layer weights, dense W per linear)",
    "write_hf_folder": "output writing (HF folder)", "write_safetensors_stream": "output writing (HF folder)",
    "build_provenance": "output writing (HF folder)",
    "LayerKwargs.__call__": "layer kwargs capture (masks, rotary)",
    "weight_energy": "per-linear bookkeeping (energy, loss)", "reconstruction_loss": "per-linear bookkeeping (energy, loss)",
    "prune_group": "per-linear bookkeeping (energy, loss)",
    "stats_pass": "Python per batch (hook loop, segment masks)", "output_pass": "Python per batch (hook loop, segment masks)",
    "_embed": "embedding pass", "embed_pass": "embedding pass",
    "load_calibration": "calibration load (Parquet, validation)",
    "compress": "engine glue (compress itself, untimed callees)",
}
FORWARD = {"stats_pass": "statistics forward (layer compute up to the last hooked linear)",
           "output_pass": "propagation forward (pruned layer -> next layer's inputs)"}


def phase(path: str) -> str:
    labels = path.split("/")
    if labels[-1] == "layer_forward":
        return FORWARD.get(labels[-2] if len(labels) > 1 else "", "layer forward (other)")
    return PHASE_OF.get(labels[-1], f"other ({labels[-1]})")


def self_times(timers: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per path: its totals minus those of its direct timed children (wall, user, system, minor faults)."""
    out = {p: dict(v) for p, v in timers.items()}
    for p, v in timers.items():
        parent = p.rpartition("/")[0]
        if parent in out:
            for k in ("wall_s", "user_s", "system_s", "minor_faults"):
                out[parent][k] -= v[k]
    return out


def phases(timers: dict[str, dict[str, float]]) -> list[tuple[str, dict[str, float]]]:
    """Non-overlapping phases (sum of self times), largest wall first."""
    acc: dict[str, dict[str, float]] = {}
    for p, v in self_times(timers).items():
        d = acc.setdefault(phase(p), {"wall_s": 0.0, "user_s": 0.0, "system_s": 0.0, "minor_faults": 0.0,
                                      "calls": 0.0})
        for k in d:
            d[k] += v[k]
    return sorted(acc.items(), key=lambda kv: -kv[1]["wall_s"])


_PY_LOC = re.compile(r"\.py:\d+$|^<frozen")
_PKG = re.compile(r"(?:^|/)((?:rac|llmcompressor|compressed_tensors)/[\w/]*\.py):\d+$")
LIBS = (("libtorch_cpu", "torch CPU kernels (libtorch_cpu: GEMM, elementwise, linalg)"),
        ("libgomp", "OpenMP runtime (libgomp)"), ("libc.so", "libc (memcpy / memset / malloc; page faults land here)"),
        ("libpython", "Python interpreter (libpython: eval loop, gc, objects)"),
        ("libtorch_python", "torch Python bindings (argument parsing, dispatch)"),
        ("_multiarray", "numpy"), ("safetensors", "safetensors"), ("libm.so", "libm"))


def _frame(f: str) -> tuple[str, str]:
    name, _, loc = f.rpartition(" (")
    return name, loc[:-1] if loc.endswith(")") else loc


def leaf_kind(frame: str) -> str:
    """The library (or 'Python code') a leaf frame lies in."""
    name, loc = _frame(frame)
    if _PY_LOC.search(loc):
        return "Python code (interpreted frames)"
    return next((label for key, label in LIBS if key in loc), f"other native ({loc})")


def summarize_samples(raw: Path, prefixes: tuple[str, ...], hz: int) -> dict[str, Any]:
    """Shares of py-spy raw samples: by innermost project frame (file:function), leaf library, leaf symbol."""
    inner: Counter[str] = Counter()
    libs: Counter[str] = Counter()
    native: Counter[str] = Counter()
    total = 0
    for line in Path(raw).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        libs[leaf_kind(frames[-1])] += n
        if not _PY_LOC.search(_frame(frames[-1])[1]):
            native[_frame(frames[-1])[0][:90]] += n
        where = "(outside the package: imports, startup)"
        for f in reversed(frames):
            name, loc = _frame(f)
            m = _PKG.search(loc)
            if m and m.group(1).startswith(prefixes):
                where = f"{m.group(1)}:{name}"
                break
        inner[where] += n
    return {"total": total, "hz": hz, "innermost": inner.most_common(25), "leaf_libs": libs.most_common(),
            "native_leaf": native.most_common(12)}


FIXES: dict[str, str] = {  # phase -> where it is spent and what is done / proposed about it
    FORWARD["stats_pass"]: (
        "Where: `rac/engine/layer.py:stats_pass` -> `layer_forward`, once per group by "
        "`rac/engine/sequential.py:_run_layer` (via `_collect`) in group-sequential order. Finished sub-blocks "
        "are replayed from the layer's earlier passes (`rac/engine/replay.py`), so per Llama layer the passes "
        "compute q/k/v + attention (group o) and the MLP's gate/up (group down) and nothing new for group "
        "gate/up. What is left: those FLOPs, and the page faults of every batch's fresh intermediates "
        "(fewer with huge pages for torch's tensors, `rac/engine/memory.py:use_huge_pages`)."),
    FORWARD["output_pass"]: (
        "Where: `rac/engine/layer.py:output_pass`. In group order it replays the attention and the MLP's "
        "recorded down_proj input, so it runs down_proj only; in layer order it is one full forward of the "
        "pruned layer (as llm-compressor's propagation pass)."),
    "solver (rac.pruners.prune)": (
        "Where: `rac/pruners/sparsegpt.py` / `obs.py` (blocked reverse Cholesky + sweep) plus "
        "`rac/pruners/base.py:check_hessian` (a full symmetry / finiteness scan of H per linear: q/k/v and "
        "gate/up share one H, so it is scanned 3x / 2x). Already 2-4x faster than llm-compressor's solver on the "
        "same problems (peer.md). Fix: validate H once per group in `rac/engine/prune_step.py:prune_group`, not once per linear."),
    "heap trimming + gc": (
        "Where: `rac/engine/memory.py:trim_heap(collect=True)` after every step in `rac/engine/sequential.py:"
        "_run_layer`. `gc.freeze()` runs again after `build_skeleton` (`memory.freeze_new_objects`), so the "
        "collection walks only the objects of the run itself. Left: collect once per layer, not per step."),
    "statistics accumulation (H += XᵀX in the hooks)": (
        "Where: `rac/pruners/stats.py:HessianAccumulator.add` -> `add_gram`: per batch and group an "
        "`all_finite` scan, then float32 GEMMs in chunks of 1024 tokens (the masked gather only when a batch "
        "has padding); widths below 1024 (all SmolLM2 groups but down_proj) get the full d x d product, not "
        "the upper triangle. Wanda and magnitude accumulate only the diagonal (`DiagAccumulator`). Left: check "
        "finiteness once on H at the end of the pass."),
    "per-linear bookkeeping (energy, loss)": (
        "Where: `rac/engine/prune_step.py:weight_energy` recomputes tr(W H Wᵀ) with a full `W @ H` per linear (as many "
        "FLOPs as one solver matmul) only to report rel_error; `reconstruction_loss` for pruners that return no "
        "loss. Fix: take the energy from the solver's factor (tr(W H Wᵀ) = ||W R||² with the R SparseGPT already "
        "has: a triangular product, half the FLOPs, no extra pass), or estimate it on a row sample."),
    "activation store I/O": (
        "Where: `rac/engine/actstore.py:ActStore.read` maps a fresh `np.memmap` window per batch and copies it "
        "(`np.array`), `rac/engine/layer.py:read_batch` casts it (`.to(dtype)`) and, for unequal lengths, "
        "scatters it into a new zero tensor: three fresh buffers per batch, each faulted in. Fix: `os.preadv` "
        "into one reused per-shape buffer (already in the compute dtype when the store is), pad in place."),
    "fsync": (
        "Where: `os.fsync` from `rac/store/artifacts.py` (atomic writes of every step file and JSON), "
        "`ActStore.commit` and the output writer: several per step. Fix: fsync once per layer (a step is only "
        "used on resume once the layer's activation store is committed), or a `durable` option off for "
        "benchmarks and CI; on network disks this line grows."),
    "hashing (sha256 of checkpoints / activations / calibration)": (
        "Where: `rac/engine/checkpoint.py:CheckpointFile.of` hashes each step file and, at a layer's end, the whole "
        "activation store just written; `Checkpoints.load_weights` re-hashes every step file when the output is "
        "written. Fix: hash while writing (feed sha256 from the buffers being written) and keep the digests of "
        "this process's own files in memory instead of re-reading them."),
    "model loading (skeleton, layer weights, dense W per linear)": (
        "Where: `rac/engine/prune_step.py:prune_linear` reads each dense W again from the shards "
        "(`WeightFiles.load`) although the layer was just materialized; `load_config` imports the model code. "
        "Fix: take W from the materialized module (same values, already in the compute dtype)."),
    "output writing (HF folder)": (
        "Where: `rac/engine/output.py:write_hf_folder` (streamed safetensors writer, fsync) and the step-file "
        "reloads with their re-hash. Fix: see hashing."),
    "Python per batch (hook loop, segment masks)": (
        "Where: the batch loops of `stats_pass` / `output_pass` (segment masks, hook bookkeeping): small; "
        "fewer, larger batches would shrink it further."),
}


def _tree(timers: dict[str, dict[str, float]], total: float, min_share: float = 0.002) -> list[str]:
    selfs = self_times(timers)
    lines = ["| call path (timed functions) | calls | inclusive s | self s | % of compress | system s (self) "
             "| minor faults (self, k) |", "|---|---|---|---|---|---|---|"]
    for p in sorted(timers):
        v = timers[p]
        if v["wall_s"] < min_share * total:
            continue
        depth = p.count("/")
        name = ("&nbsp;&nbsp;" * depth) + p.rpartition("/")[2]
        s = selfs[p]
        lines.append(f"| {name} | {v['calls']:.0f} | {v['wall_s']:.2f} | {s['wall_s']:.2f} "
                     f"| {100 * v['wall_s'] / total:.1f} | {s['system_s']:.2f} | {s['minor_faults'] / 1e3:.0f} |")
    return lines


def _phase_table(timers: dict[str, dict[str, float]], total: float) -> list[str]:
    cpu = sum(v["user_s"] + v["system_s"] for _, v in phases(timers)) or 1.0
    lines = ["| phase | wall s | % of wall | % of CPU | user s | system s | minor faults (k) |",
             "|---|---|---|---|---|---|---|"]
    for name, v in phases(timers):
        lines.append(f"| {name} | {v['wall_s']:.2f} | {100 * v['wall_s'] / total:.1f} "
                     f"| {100 * (v['user_s'] + v['system_s']) / cpu:.1f} | {v['user_s']:.2f} "
                     f"| {v['system_s']:.2f} | {v['minor_faults'] / 1e3:.0f} |")
    return lines


def _samples(s: dict[str, Any], what: str) -> list[str]:
    n = s["total"] or 1
    lines = [f"{s['total']} samples at {s['hz']} Hz.", "", f"| innermost {what} frame | share |", "|---|---|"]
    lines += [f"| `{k}` | {100 * c / n:.1f}% |" for k, c in s["innermost"][:15]]
    lines += ["", "| leaf frame lies in | share |", "|---|---|"]
    lines += [f"| {k} | {100 * c / n:.1f}% |" for k, c in s["leaf_libs"]]
    lines += ["", "| top native leaf functions | share |", "|---|---|"]
    lines += [f"| `{k.replace('|', '/')}` | {100 * c / n:.1f}% |" for k, c in s["native_leaf"][:8]]
    return [*lines, ""]


def _run_section(run: dict[str, Any]) -> list[str]:
    t = run["timers"]
    total = t["timers"]["compress"]["wall_s"]
    u = t["usage"]
    sp = run["sampled"]
    lines = [f"## {run['label']}", "",
             f"Timed run: compress {total:.1f} s (load {t['load_before'][0]:.1f} -> {t['load_after'][0]:.1f}); "
             f"user {u['user_s']:.1f} s, system {u['system_s']:.1f} s, {u['minor_faults'] / 1e6:.2f} M minor "
             f"faults, peak RSS {t['peak_rss_mb']:.0f} MiB (import baseline {t['baseline_rss_mb']:.0f}). "
             f"Sampled (uninstrumented) run: {sp['wall_s']:.1f} s, system {sp['usage']['system_s']:.1f} s, "
             f"{sp['usage']['minor_faults'] / 1e6:.2f} M minor faults (load {run['sampled_load'][0]:.1f} -> "
             f"{run['sampled_load'][1]:.1f}).", "",
             "### Phases (self time of every timed call path, so they add up to the compress call)", "",
             *_phase_table(t["timers"], total), "", "### Call paths (>= 0.2% of the call)", "",
             *_tree(t["timers"], total), "", "### Sampling (py-spy, native frames)", "",
             *_samples(run["samples"], "rac")]
    if t.get("missing"):
        lines += [f"Not found (not timed): {', '.join(t['missing'])}.", ""]
    return lines


def _experiments(run: dict[str, Any]) -> list[str]:
    exps = run.get("experiments") or []
    if not exps:
        return []
    lines = [f"## Experiments on {run['label']} (timed runs; rac unchanged, the setting applied from outside)", "",
             "| run | compress wall s | CPU s (user + system) | system s | minor faults (M) | gc.collect s "
             "| statistics forward s | propagation forward s | peak RSS MiB | peak - import MiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [{**run["timers"], "label": "as is"}, *exps]:
        ph, u = dict(phases(r["timers"])), r["usage"]
        gc_s = sum(v["wall_s"] for p, v in self_times(r["timers"]).items() if p.endswith("gc.collect"))
        sf = ph.get(FORWARD["stats_pass"], {"wall_s": 0.0})["wall_s"]
        pf = ph.get(FORWARD["output_pass"], {"wall_s": 0.0})["wall_s"]
        lines.append(f"| {r['label']} | {r['timers']['compress']['wall_s']:.1f} | {u['user_s'] + u['system_s']:.1f} "
                     f"| {u['system_s']:.1f} | {u['minor_faults'] / 1e6:.2f} | {gc_s:.1f} | {sf:.1f} | {pf:.1f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} "
                     f"| {r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |")
    return [*lines, ""]


def _findings(run: dict[str, Any]) -> list[str]:
    total = run["timers"]["timers"]["compress"]["wall_s"]
    lines = [f"## Largest items and fixes ({run['label']})", ""]
    for i, (name, v) in enumerate(phases(run["timers"]["timers"])[:8], start=1):
        fix = FIXES.get(name, "")
        lines.append(f"{i}. **{name}: {v['wall_s']:.1f} s ({100 * v['wall_s'] / total:.0f}%)**, system "
                     f"{v['system_s']:.1f} s, {v['minor_faults'] / 1e6:.2f} M minor faults. {fix}")
    return [*lines, ""]


def _phase_s(timers: dict[str, dict[str, float]], name: str) -> float:
    return dict(phases(timers)).get(name, {"wall_s": 0.0})["wall_s"]


def _summary(res: dict[str, Any]) -> list[str]:
    """The headline numbers of the first run, the experiments against it, and the peer's split."""
    run = res["runs"][0]
    t, u = run["timers"]["timers"], run["timers"]["usage"]
    total, cpu = t["compress"]["wall_s"], u["user_s"] + u["system_s"]
    sf, pf = _phase_s(t, FORWARD["stats_pass"]), _phase_s(t, FORWARD["output_pass"])
    acc = _phase_s(t, "statistics accumulation (H += XᵀX in the hooks)")
    lines = ["## Summary", "",
             f"- {run['label']}: compress {total:.1f} s wall, {cpu:.1f} s CPU, of which {u['system_s']:.1f} s "
             f"({100 * u['system_s'] / cpu:.0f}%) system time for {u['minor_faults'] / 1e6:.1f} M minor page "
             f"faults. Layer forwards: {sf + pf:.1f} s ({100 * (sf + pf) / total:.0f}%): the statistics passes "
             f"{sf:.1f} s, i.e. {sf / pf:.2f}x the one propagation forward ({pf:.1f} s); H accumulation {acc:.1f} s; "
             f"the solver {_phase_s(t, 'solver (rac.pruners.prune)'):.1f} s."]
    for e in run.get("experiments") or []:
        eu = e["usage"]
        lines.append(f"- {e['label']}: compress {e['timers']['compress']['wall_s']:.1f} s "
                     f"({e['timers']['compress']['wall_s'] - total:+.1f} s), system {eu['system_s']:.1f} s "
                     f"({eu['system_s'] - u['system_s']:+.1f}), minor faults {eu['minor_faults'] / 1e6:.1f} M, peak RSS "
                     f"{e['peak_rss_mb']:.0f} MiB ({e['peak_rss_mb'] - run['timers']['peak_rss_mb']:+.0f}).")
    if res.get("peer"):
        p = res["peer"]
        sp, n = p["sampled"], p["samples"]["total"] or 1
        share = dict(p["samples"]["innermost"])
        fwd = sum(c for k, c in share.items() if k.endswith("offload_module.<locals>.forward")) / n
        lines.append(f"- For comparison, {p['label']} (under py-spy, which slows it a little): {sp['wall_s']:.1f} s "
                     f"wall, about {fwd * sp['wall_s']:.0f} s of it in the layer forwards (calibration + propagation: "
                     f"two per layer), {sp.get('stats_accumulate_s', 0.0):.1f} s in `accumulate_hessian`, "
                     f"{sp['solver_s']:.1f} s in `sparsify_weight`; system {sp['usage']['system_s']:.1f} s for "
                     f"{sp['usage']['minor_faults'] / 1e6:.1f} M minor faults.")
    return [*lines, ""]


def profile_markdown(res: dict[str, Any]) -> str:
    """profile.md from `bench.peer_profile`'s results."""
    m, c = res["machine"], res["sets"]["calib"]
    lines = ["# Where rac's end-to-end time goes (SmolLM2-135M, float32, CPU)", "",
             f"Command: `{res['command']}`, {res['started']} to {res['finished']}; code: "
             f"{res.get('source', 'unknown')}. Machine: {m['cpu']}, "
             f"{m['cores']} cores shared with other jobs (load averages per run below); {res['threads']} thread(s) "
             f"(OMP/MKL fixed in each child), OMP_WAIT_POLICY=PASSIVE. Inputs: `bench.peer`'s calibration set, "
             f"{c['n_seqs']} sequences, {c['n_tokens']} tokens. Method and code: `bench/peer_profile.py` "
             "(timers around rac's functions; py-spy sampling of an uninstrumented run), "
             "`bench/peer_profile_report.py` (phases, this report).", "", *_summary(res)]
    for run in res["runs"]:
        lines += _findings(run)
    for run in res["runs"]:
        lines += _experiments(run)
    for run in res["runs"]:
        lines += _run_section(run)
    if res.get("peer"):
        p = res["peer"]
        r = p["sampled"]
        lines += [f"## For comparison: {p['label']} (sampled)", "",
                  f"Wall {r['wall_s']:.1f} s (load {r['stages']['load_s']:.1f}, oneshot {r['stages']['oneshot_s']:.1f}, "
                  f"save {r['stages']['save_s']:.1f}); solver (sparsify_weight) {r['solver_s']:.1f} s, statistics "
                  f"hooks (accumulate_hessian) {r.get('stats_accumulate_s', float('nan')):.1f} s; system "
                  f"{r['usage']['system_s']:.1f} s, {r['usage']['minor_faults'] / 1e6:.2f} M minor faults, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MiB.", "", *_samples(p["samples"], "llm-compressor")]
    return "\n".join(lines) + "\n"
