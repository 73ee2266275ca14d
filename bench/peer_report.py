"""Markdown of `bench.peer`'s results (peer.json -> peer.md) and the README's comparison table.

Every number printed comes from the JSON of one run; ratios are computed here from those numbers only.
"""

from __future__ import annotations

from typing import Any

from bench.peer_data import paired_nll_interval

METHOD_NAMES = {"sgpt50": "SparseGPT 50%", "sgpt24": "SparseGPT 2:4", "wanda50": "Wanda 50%"}


def _load(r: dict[str, Any]) -> str:
    return f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}"


def _header(res: dict[str, Any]) -> list[str]:
    m, v = res["machine"], res["versions"]
    peer, rac = v["peer"], v["rac"]
    return [
        "# rac vs llm-compressor, side by side (CPU)", "",
        f"Command: `{res['command']}` ({'quick mode' if res.get('quick') else 'full set'}), "
        f"{res['started']} to {res['finished']}; code: {res.get('source', 'unknown')}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other jobs (load average "
        f"{res['load_at_start'][0]:.1f} at the start, {res['load_at_end'][0]:.1f} at the end; per run below as "
        "before / after). OMP_WAIT_POLICY=PASSIVE, OMP/MKL threads fixed per child process.",
        f"rac {rac['rac']} (torch {rac['torch']}, transformers {rac['transformers']}) in the project venv; "
        f"llm-compressor {peer['llmcompressor']} (compressed-tensors {peer['compressed-tensors']}, torch "
        f"{peer['torch']}, transformers {peer['transformers']}) in bench/.venv-peer.",
        "Every row is a fresh process, one at a time, the two tools interleaved. wall = the measured region "
        "(after imports); peak RSS = VmHWM of the child; import RSS = its RSS after importing the tool; "
        "minor faults and system s are getrusage deltas over the region.", "",
    ]


def _solver(res: dict[str, Any]) -> list[str]:
    recs = res.get("solver") or []
    if not recs:
        return []
    lines = ["## Fixed solver problems (float32)", "",
             "W [rows, cols] random, H = XᵀX of 8192 correlated tokens (seeded, `bench.peer_data.solver_problem`), "
             "damping 0.01 mean(diag H), block 128. seconds = best of the repeats; loss = tr(ΔW H ΔWᵀ) of each "
             "result, computed by the parent with `rac.pruners.error.reconstruction_loss`; `vs peer` = the "
             "peer's seconds / this row's seconds (same shape, pattern, threads).", "",
             "| rows x cols | threads | pattern | solver | seconds | vs peer | loss | loss / peer | sparsity "
             "| load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        peer = next(p for p in recs if p["tool"] == "peer" and p["shape"] == r["shape"]
                    and p["method"] == r["method"] and p["threads"] == r["threads"])
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {METHOD_NAMES[r['method']]} "
                     f"| {r['label']} | {r['seconds']:.3f} | {peer['seconds'] / r['seconds']:.2f}x "
                     f"| {r['loss']:.5g} | {r['loss'] / peer['loss']:.4f} | {r['sparsity']:.4f} | {_load(r)} |")
    return [*lines, ""]


def _key(r: dict[str, Any]) -> tuple[str, int, str]:
    return (r["method"], r["threads"], r["label"])


def _cpu(r: dict[str, Any]) -> float:
    return float(r["usage"]["user_s"] + r["usage"]["system_s"])


def best_runs(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, threads, run label) the run with the smallest wall time, in first-seen order."""
    best: dict[tuple[str, int, str], dict[str, Any]] = {}
    for r in recs:
        k = _key(r)
        if k not in best or r["wall_s"] < best[k]["wall_s"]:
            best[k] = r
    return list(best.values())


def _peer_of(recs: list[dict[str, Any]], r: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in recs if p["tool"] == "peer" and p["method"] == r["method"] and p["threads"] == r["threads"])


E2E_HEAD = ("| method | threads | run | wall s | CPU s | solver s | wall - solver | time / peer | CPU / peer "
            "| peak RSS MiB | import RSS MiB | peak - import | minor faults (M) | system s | NLL | PPL "
            "| ΔNLL vs peer [95%] | load |")


def _e2e_row(r: dict[str, Any], peer: dict[str, Any], rounds: bool) -> str:
    if r is peer:
        delta = "—"
    else:
        d, lo, hi = paired_nll_interval(r["heldout"], peer["heldout"])
        delta = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    u = r["usage"]
    label = r['label'] + (f" (round {r['round'] + 1})" if rounds else "")
    return (f"| {METHOD_NAMES[r['method']]} | {r['threads']} | {label} | {r['wall_s']:.1f} | {_cpu(r):.1f} "
            f"| {r['solver_s']:.1f} | {r['wall_s'] - r['solver_s']:.1f} | {r['wall_s'] / peer['wall_s']:.2f} "
            f"| {_cpu(r) / _cpu(peer):.2f} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} "
            f"| {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {u['minor_faults'] / 1e6:.2f} | {u['system_s']:.1f} "
            f"| {r['heldout']['nll']:.4f} | {r['heldout']['ppl']:.4f} | {delta} | {_load(r)} |")


def _e2e(res: dict[str, Any]) -> list[str]:
    recs = res.get("e2e") or []
    if not recs:
        return []
    sets, dense = res["sets"], res["dense"]["heldout"]
    c, h = sets["calib"], sets["heldout"]
    n_rounds = 1 + max(r.get("round", 0) for r in recs)
    lines = [
        "## End to end: SmolLM2-135M, float32", "",
        f"Calibration: {c['n_seqs']} GSM8K prompts + the dense model's own answers, {c['n_tokens']} tokens "
        f"({c['decode_tokens']} answer tokens), the same token ids for both tools (rac reads the Parquet, "
        f"llm-compressor its `datasets` export; sha256 {c['sha256'][:12]}). Held-out: {h['n_seqs']} other GSM8K "
        f"prompts + the dense model's answers; NLL/PPL over their {dense['tokens']} answer tokens, every output "
        f"folder loaded by transformers in float32 and scored by `bench.peer_data.heldout_nll`. Dense model: "
        f"NLL {dense['nll']:.4f}, PPL {dense['ppl']:.4f}.",
        "rac: `rac.engine.compress` with its defaults except compute/activation dtype float32 (the row says "
        "which order and mask scope ran); llm-compressor: `oneshot` with SparseGPTModifier / "
        "WandaPruningModifier (lm_head ignored, as rac excludes it), batch_size 1, every sample, in float32, "
        "saved with `save_pretrained(save_compressed=False)` in the checkpoint's dtype (bf16, as rac writes). "
        "CPU s = user + system CPU time of the region (less sensitive than wall time to other jobs on the "
        "cores). solver s: rac = sum of per-linear seconds of its step records; llm-compressor = time inside its "
        "`sparsify_weight` calls. `time / peer`, `CPU / peer`: against the peer's run of the same method and "
        "threads. ΔNLL vs peer: this row's NLL minus the peer's on the same held-out tokens, with a 95% paired "
        "bootstrap interval over sequences.", ""]
    if n_rounds > 1:
        best = best_runs(recs)
        lines += [f"### Best of {n_rounds} rounds (smallest wall time per row; the order alternated between "
                  "rounds)", "", E2E_HEAD, "|---" * 18 + "|"]
        lines += [_e2e_row(r, _peer_of(best, r), False) for r in best]
        lines += ["", "### Every run", ""]
    lines += [E2E_HEAD, "|---" * 18 + "|"]
    lines += [_e2e_row(r, _peer_of([p for p in recs if p.get("round", 0) == r.get("round", 0)], r), n_rounds > 1)
              for r in recs]
    return [*lines, "", *_notes(res)]


def _notes(res: dict[str, Any]) -> list[str]:
    peers = [r for r in res["e2e"] if r["tool"] == "peer"]
    stages = "; ".join(f"{METHOD_NAMES[r['method']]} t={r['threads']}: load {r['stages']['load_s']:.1f} s, oneshot "
                       f"{r['stages']['oneshot_s']:.1f} s (statistics hooks {r.get('stats_accumulate_s', 0):.1f} s), "
                       f"save {r['stages']['save_s']:.1f} s" for r in peers)
    lines = [f"llm-compressor's measured region split: {stages}.", ""]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in res["e2e"]:
        by.setdefault((r["method"], r["label"]), []).append(r)
    spread = [(k, max(x["heldout"]["nll"] for x in v) - min(x["heldout"]["nll"] for x in v))
              for k, v in by.items() if len({x["threads"] for x in v}) > 1]
    if spread:
        worst = max(d for _, d in spread)
        items = "; ".join(f"{METHOD_NAMES[m]} {label}: {d:.4f}" for (m, label), d in spread)
        lines += [f"Run-to-run spread of the held-out NLL with the same tool and settings at different thread counts "
                  f"(floating-point reduction order changes some mask choices): {items}. Differences between rows "
                  f"smaller than about {worst:.3f} nats are within this spread, whatever their bootstrap interval "
                  "(which covers the choice of held-out sequences only).", ""]
    return lines


def to_markdown(res: dict[str, Any]) -> str:
    """peer.md from the results dict."""
    return "\n".join([*_header(res), *_solver(res), *_e2e(res)]) + "\n"


def readme_markdown(res: dict[str, Any]) -> str:
    """A compact table for the README's comparison section: measured numbers only, from peer.json."""
    recs = best_runs(res.get("e2e") or [])
    lines = ["| SmolLM2-135M fp32, same tokens | threads | wall s | CPU s | solver s | peak RSS MiB | held-out PPL |",
             "|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(f"| {METHOD_NAMES[r['method']]}: {r['label']} | {r['threads']} | {r['wall_s']:.0f} "
                     f"| {_cpu(r):.0f} | {r['solver_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['heldout']['ppl']:.3f} |")
    c = res["sets"]["calib"] if recs else None
    where = (f"{c['n_tokens']} calibration tokens (GSM8K prompts + the model's own answers), "
             f"{res['machine']['cores']} shared CPU cores") if c else ""
    return "\n".join([*lines, "", f"From `make bench-peer` ({res['started'][:10]}; bench/results/peer.md): "
                      f"{where}, one process at a time."]) + "\n"
