"""rac vs llm-compressor side by side on identical inputs (`make bench-peer`; rac issue 14, item 1).

    .venv/bin/python -m bench.peer [--quick] [--parts solver,e2e] [--threads 1,2]
        [--methods sgpt50,sgpt24,wanda50] [--rac-variants default,matrix,row,layer] [--rounds 1] [--out DIR]
    .venv/bin/python -m bench.peer --readme-table      # the README comparison table from peer.json

llm-compressor 0.14 lives in its own venv, bench/.venv-peer (created here on first use: the CPU torch wheel
first, then llmcompressor, which pins transformers <= 5.17; never installed into the project venv).
Every measurement is a fresh child process (one at a time, OMP/MKL threads fixed in its environment, the two
tools interleaved per method and thread count): `bench.peer_rac` in the project venv, `bench.peer_child` in
the peer venv. Each child reports wall time, solver time, peak RSS (VmHWM), the RSS after its imports, page
faults and CPU times (`bench.peer_proc`); the parent records the load average before and after each child.
  solver  fixed problems W 1536x576 and 576x1536, H from 8192 correlated tokens (`peer_data.solver_problem`),
          SparseGPT 50% and 2:4: rac's `sparsegpt` vs llm-compressor's `sparsify_weight`, loss
          tr(ΔW H ΔWᵀ) of both results computed here by one function (`rac.pruners.error.reconstruction_loss`).
  e2e     SmolLM2-135M in float32 on one calibration set of GSM8K prompts plus the dense model's own answers
          (`peer_data.build_sets`, exported so llm-compressor reads the same token ids): SparseGPT 50%, 2:4,
          Wanda 50%; rac `compress` with its default options (float32 compute and activations) and the
          variants asked for; llm-compressor `oneshot`. Every output folder is scored by
          `peer_data.heldout_nll` on the same held-out prompts + answers.
Writes peer.json and peer.md (bench/results/, or --out); --quick (small sets, 1 thread, 2 methods) writes to
bench/.cache/peer/quick-results/ unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from bench.peer_data import CACHE, Sets, SetsSpec, build_sets, heldout_nll, solver_problem
from bench.peer_proc import parse
from bench.peer_report import readme_markdown, to_markdown
from bench.solvers import machine, write_atomic
from rac.engine import CompressConfig
from rac.models.assets import resolve_model
from rac.pruners import PruneConfig
from rac.pruners.error import reconstruction_loss

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PEER_VENV = ROOT / "bench" / ".venv-peer"
PEER_PY = PEER_VENV / "bin" / "python"
PEER_PINS = (("torch==2.13.0",), ("llmcompressor==0.14.*", "transformers<=5.17"))  # install steps, in order
METHODS: dict[str, dict[str, Any]] = {
    "sgpt50": {"method": "sparsegpt", "sparsity": 0.5},
    "sgpt24": {"method": "sparsegpt", "nm": (2, 4)},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
}
DEFAULT_VARIANTS = {"sgpt50": ["default", "matrix", "row", "layer"], "sgpt24": ["default"], "wanda50": ["default"]}
RAC_VARIANTS: dict[str, dict[str, Any]] = {  # applied on top of rac's defaults (float32 compute/activations)
    "default": {},
    "matrix": {"prune": {"scope": "matrix"}},  # unstructured SparseGPT only: per block over all rows
    "row": {"prune": {"scope": "row"}},  # unstructured SparseGPT only: exactly the target share per row
    "layer": {"sequential": "layer"},
    "group": {"sequential": "group"},  # Wanda: its default is layer order
}
SOLVER_SHAPES = ((1536, 576), (576, 1536))
MODEL = "smollm2-135m"
CHILD_TIMEOUT_S = 3600


def ensure_peer_venv() -> dict[str, str]:
    """Create bench/.venv-peer with llm-compressor if it is not there yet; its package versions."""
    stamp = PEER_VENV / ".peer-installed"
    wanted = json.dumps(PEER_PINS)
    if not (stamp.is_file() and stamp.read_text() == wanted):
        if not PEER_PY.exists():
            subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
            subprocess.run([str(PEER_PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        for step in PEER_PINS:  # torch first: the CPU wheel, so llmcompressor never pulls a CUDA build
            subprocess.run([str(PEER_PY), "-m", "pip", "install", "-q", *step], check=True)
        stamp.write_text(wanted)
    out = subprocess.run([str(PEER_PY), "-c", "import json; from importlib.metadata import version; print(json.dumps("
                          "{p: version(p) for p in ('llmcompressor', 'compressed-tensors', 'torch', 'transformers', "
                          "'datasets', 'accelerate')}))"], check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env.update(OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONPATH=str(ROOT))
    return env


def run_child(tool: str, args: dict[str, Any], threads: int, module: str | None = None,
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One measurement in a fresh process of `tool`'s venv (rac: `module`, default bench.peer_rac; peer:
    bench.peer_child; `extra_env` added to its environment); the child's result plus load averages."""
    py, default = (sys.executable, "bench.peer_rac") if tool == "rac" else (str(PEER_PY), "bench.peer_child")
    module = module or default
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run([py, "-m", module, json.dumps({**args, "threads": threads})], cwd=ROOT,
                          env={**_child_env(threads), **(extra_env or {})}, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          check=False)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} child {args['kind']} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = parse(proc.stdout)
    res.update(tool=tool, threads=threads, process_s=process_s, load_before=list(load_before),
               load_after=list(os.getloadavg()))
    return res


def _prune_cfg(method: str, variant: dict[str, Any] | None = None) -> PruneConfig:
    return PruneConfig.model_validate({**METHODS[method], **((variant or {}).get("prune", {}))})


def solver_part(tmp: Path, threads: list[int], methods: list[str], repeats: int) -> list[dict[str, Any]]:
    """rac's sparsegpt vs llm-compressor's sparsify_weight on the fixed problems, interleaved."""
    records = []
    for rows, cols in SOLVER_SHAPES:
        W, H = solver_problem(rows, cols)
        problem = tmp / f"problem-{rows}x{cols}.safetensors"
        save_file({"W": W, "H": H}, str(problem))
        for t in threads:
            for method in (m for m in methods if METHODS[m]["method"] == "sparsegpt"):
                nm = METHODS[method].get("nm")
                default = _prune_cfg(method)
                jobs: list[tuple[str, str, dict[str, Any]]] = [
                    ("rac", f"rac sparsegpt, {_pattern(default)}", {"cfg": default.canonical()}),
                    ("peer", "llm-compressor sparsify_weight", {"sparsity": 0.5, "nm": list(nm) if nm else None})]
                if nm is None:  # the other unstructured mask scope too
                    other = _prune_cfg(method, {"prune": {"scope": "row" if default.scope == "matrix" else "matrix"}})
                    jobs.append(("rac", f"rac sparsegpt, {_pattern(other)}", {"cfg": other.canonical()}))
                for tool, label, extra in jobs:
                    out = tmp / "w_hat.safetensors"
                    res = run_child(tool, {"kind": "solver", "problem": str(problem), "out": str(out),
                                           "repeats": repeats, **extra}, t)
                    W_hat = load_file(str(out))["W_hat"]
                    res.update(label=label, method=method, shape=[rows, cols],
                               loss=reconstruction_loss(W, W_hat, H), sparsity=float((W_hat == 0).float().mean()))
                    records.append(res)
                    print(f"  solver {rows}x{cols} t={t} {method} {label}: {res['seconds']:.3f} s "
                          f"loss {res['loss']:.5g}", flush=True)
    return records


def rac_configs(method: str, variants: list[str]) -> list[tuple[str, CompressConfig]]:
    """(variant, config) for rac in float32; variants that do not apply or repeat another's config dropped."""
    out: list[tuple[str, CompressConfig]] = []
    for name in variants:
        v = RAC_VARIANTS[name]
        if "prune" in v and (METHODS[method]["method"] != "sparsegpt" or "nm" in METHODS[method]):
            continue
        data = {"prune": _prune_cfg(method, v).canonical(), "compute_dtype": "float32", "act_dtype": "float32",
                **{k: x for k, x in v.items() if k != "prune"}}
        cfg = CompressConfig.model_validate(data)
        if all(c.canonical() != cfg.canonical() for _, c in out):
            out.append((name, cfg))
    return out


def _pattern(p: PruneConfig) -> str:
    return f"{p.nm[0]}:{p.nm[1]}" if p.nm else f"scope={p.scope}"


def rac_label(cfg: CompressConfig) -> str:
    """A row label naming the settings the run actually used."""
    stats = ", diag H" if cfg.diag_statistics else ""
    return f"rac compress ({cfg.order}-sequential, {_pattern(cfg.prune)}{stats}, {cfg.compute_dtype})"


def _score(res: dict[str, Any], out: Path, sets: Sets) -> None:
    res["heldout"] = heldout_nll(out, sets.heldout)
    shutil.rmtree(out, ignore_errors=True)
    cpu = res["usage"]["user_s"] + res["usage"]["system_s"]
    print(f"  e2e t={res['threads']} {res['method']} {res['label']}: wall {res['wall_s']:.1f} s, cpu {cpu:.1f} s, solver "
          f"{res['solver_s']:.1f} s, peak {res['peak_rss_mb']:.0f} MiB, PPL {res['heldout']['ppl']:.4f}", flush=True)


def e2e_part(tmp: Path, model: Path, sets: Sets, threads: list[int], methods: list[str],
             variants: dict[str, list[str]], rounds: int) -> list[dict[str, Any]]:
    """rac compress and llm-compressor oneshot on SmolLM2, interleaved per method and thread count; `rounds`
    repetitions of the whole sequence, every other one in reverse order (the peer first)."""
    plan: list[tuple[int, str, str, str, CompressConfig | None]] = []
    for t in threads:
        for method in methods:  # the extra variants (row, layer) at the first thread count only
            cfgs = rac_configs(method, [v for v in variants[method] if t == threads[0] or v in ("default", "matrix")])
            jobs: list[tuple[str, str, CompressConfig | None]] = [("rac", cfgs[0][0], cfgs[0][1]),
                                                                 ("peer", "oneshot", None)]
            jobs += [("rac", name, cfg) for name, cfg in cfgs[1:]]
            plan += [(t, method, *job) for job in jobs]
    records = []
    for r in range(rounds):
        for t, method, tool, variant, cfg in (plan if r % 2 == 0 else _reversed_per_method(plan)):
            res = _e2e_run(tmp, model, sets, t, method, tool, cfg)
            res.update(variant=variant, round=r)
            _score(res, tmp / "out", sets)
            records.append(res)
    return records


def _reversed_per_method(plan: list[Any]) -> list[Any]:
    """The plan with the jobs of each (threads, method) block in reverse order."""
    out: list[Any] = []
    i = 0
    while i < len(plan):
        j = i
        while j < len(plan) and plan[j][:2] == plan[i][:2]:
            j += 1
        out += plan[i:j][::-1]
        i = j
    return out


def _e2e_run(tmp: Path, model: Path, sets: Sets, t: int, method: str, tool: str,
             cfg: CompressConfig | None) -> dict[str, Any]:
    out = tmp / "out"
    args: dict[str, Any]
    if tool == "rac":
        assert cfg is not None
        args = {"kind": "compress", "model": str(model), "calib": str(sets.calib), "out": str(out),
                "work": str(tmp / "work"), "cfg": cfg.canonical()}
        label = rac_label(cfg)
    else:
        spec = METHODS[method]
        args = {"kind": "oneshot", "model": str(model), "calib": str(sets.calib_export), "out": str(out),
                "method": spec["method"], "sparsity": 0.5, "nm": list(spec["nm"]) if "nm" in spec else None}
        label = "llm-compressor oneshot (layer-sequential, float32)"
    res = run_child(tool, args, t)
    shutil.rmtree(tmp / "work", ignore_errors=True)
    res.update(label=label, method=method)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _parse(argv)
    out_dir = a.out or (CACHE / "quick-results" if a.quick else RESULTS)
    spec = SetsSpec(calib_prompts=16, calib_tokens=3000, heldout_prompts=8, max_new_tokens=128) if a.quick \
        else SetsSpec()
    parts, threads = a.parts.split(","), [int(x) for x in a.threads.split(",")]
    methods = a.methods.split(",")
    variants = {m: (a.rac_variants.split(",") if a.rac_variants else DEFAULT_VARIANTS[m]) for m in METHODS}
    bad = [m for m in methods if m not in METHODS] + [v for vs in variants.values() for v in vs
                                                      if v not in RAC_VARIANTS]
    if bad:
        raise SystemExit(f"unknown method/variant {bad}; methods {list(METHODS)}, variants {list(RAC_VARIANTS)}")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results: dict[str, Any] = {"command": " ".join(["python -m bench.peer", *(argv if argv is not None else
                                                                            sys.argv[1:])]),
                               "quick": a.quick, "machine": machine(), "started": started,
                               "load_at_start": list(os.getloadavg()), "source": _source()}
    results["versions"] = {"peer": ensure_peer_venv(), "rac": parse_versions()}
    model = resolve_model(MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="rac-bench-peer-"))
    try:
        if "solver" in parts:
            results["solver"] = solver_part(tmp, threads, methods, 1 if a.quick else 3)
        if "e2e" in parts:
            sets = build_sets(model, spec)
            results.update(model={"alias": MODEL, "path": str(model)}, sets=sets.info)
            results["dense"] = {"heldout": heldout_nll(model, sets.heldout)}
            results["e2e"] = e2e_part(tmp, model, sets, threads, methods, variants, a.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), load_at_end=list(os.getloadavg()))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "peer.json", json.dumps(results, indent=1, default=str) + "\n")
    write_atomic(out_dir / "peer.md", to_markdown(results))
    print(f"wrote {out_dir / 'peer.json'} and {out_dir / 'peer.md'}")
    return results


def _source() -> str:
    """Which code ran: $RAC_BENCH_SOURCE (e.g. set when running from an exported snapshot), else git HEAD."""
    if os.environ.get("RAC_BENCH_SOURCE"):
        return os.environ["RAC_BENCH_SOURCE"]
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return f"git {out.stdout.strip()} (working tree, may hold uncommitted edits)" if out.returncode == 0 else "unknown"


def parse_versions() -> dict[str, str]:
    from importlib.metadata import version

    import rac

    return {"rac": rac.__version__, **{p: version(p) for p in ("torch", "transformers", "datasets")}}


def readme_table(results: dict[str, Any] | None = None) -> str:
    """The README's comparison table, generated from peer.json (the committed results by default)."""
    data = results if results is not None else json.loads((RESULTS / "peer.json").read_text())
    return readme_markdown(data)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sets, 1 thread, sgpt50 + wanda50")
    p.add_argument("--parts", default="solver,e2e")
    p.add_argument("--threads", default=None)
    p.add_argument("--methods", default=None)
    p.add_argument("--rac-variants", default=None,
                   help="rac variants for every method (default: sgpt50 default,matrix,layer; others default)")
    p.add_argument("--rounds", type=int, default=1, help="repetitions of the e2e sequence (alternating order)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--readme-table", action="store_true", help="print the README table from peer.json and exit")
    a = p.parse_args(argv)
    a.threads = a.threads or ("1" if a.quick else "1,2")
    a.methods = a.methods or ("sgpt50,wanda50" if a.quick else ",".join(METHODS))
    return a


if __name__ == "__main__":
    if "--readme-table" in sys.argv[1:]:
        print(readme_table())
    else:
        main()
