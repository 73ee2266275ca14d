"""Where rac's end-to-end time goes on `bench.peer`'s problem (rac issue 14, item 3) -> bench/results/profile.md.

    .venv/bin/python -m bench.peer_profile [--quick] [--threads 1] [--method sgpt50] [--variants default,layer]
        [--no-peer] [--out DIR]

The same inputs as `bench.peer` (SmolLM2-135M, float32, its cached calibration set). For each rac variant,
two fresh child processes run the same `rac.engine.compress`:
  1. timers: rac's functions wrapped in place (module attributes replaced before the run; rac itself is not
     edited), each call recording wall time, user and system CPU time and minor page faults
     (getrusage deltas) under its call path (`stats_pass/layer_forward/HessianAccumulator.add`), so the
     table shows inclusive and self time per path. The wrappers cost about 2 us per call.
  2. sampling: py-spy (installed once into bench/.cache/tools, never the project venv) samples an
     uninstrumented `bench.peer_rac` child at 10 Hz with native frames; each sample is attributed to the
     innermost rac function on its stack and to the library of its leaf frame (torch kernels, libc =
     memcpy / memset / page-fault touching, OpenMP, Python interpreter ...).
For the default variant, three more timed runs switch one of rac's speed settings off or change it from
outside (`EXPERIMENTS`: sub-block replay, huge pages for torch's tensors, glibc's mmap threshold) and compare
with the plain timed run.
llm-compressor's `oneshot` gets the sampling run too (innermost llmcompressor / compressed_tensors frame),
for comparison. The report and the fixes are in `bench.peer_profile_report`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)
from bench.peer_proc import Meter, emit, parse

TOOLS = Path(__file__).resolve().parent / ".cache" / "tools"
PYSPY = TOOLS / "bin" / "py-spy"
PYSPY_PIN = "py-spy==0.4.3"
SAMPLE_HZ = 10  # native unwinding pauses the child per sample: 100 Hz tripled its wall time here


class Timers:
    """Wall / CPU / minor-fault totals per call path of the wrapped functions."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0.0])

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            self.stack.append(label)
            path = "/".join(self.stack)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                self.stack.pop()
                tot = self.totals[path]
                tot[0] += 1
                tot[1] += t1 - t0
                tot[2] += r1.ru_utime - r0.ru_utime
                tot[3] += r1.ru_stime - r0.ru_stime
                tot[4] += r1.ru_minflt - r0.ru_minflt

        return timed

    def patch(self, owner: Any, attr: str, label: str | None = None) -> bool:
        """Replace `owner.attr` by its timed wrapper; False when the attribute does not exist (code moved)."""
        fn = getattr(owner, attr, None)
        if fn is None:
            return False
        setattr(owner, attr, self.wrap(label or attr, fn))
        return True

    def as_json(self) -> dict[str, dict[str, float]]:
        keys = ("calls", "wall_s", "user_s", "system_s", "minor_faults")
        return {p: dict(zip(keys, v, strict=True)) for p, v in self.totals.items()}


class _Libc:
    """Stands in for rac.engine.memory's libc handle so `malloc_trim` calls can be timed."""

    def __init__(self, libc: Any, timers: Timers) -> None:
        self._libc = libc
        self.malloc_trim = timers.wrap("malloc_trim", libc.malloc_trim)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._libc, name)


def instrument(timers: Timers) -> list[str]:
    """Wrap rac's engine functions (and os.fsync, gc.collect, sha256) in place; the names not found."""
    import rac.engine.actstore as act
    import rac.engine.checkpoint as ckpt
    import rac.engine.layer as layer
    import rac.engine.memory as memory
    import rac.engine.output as output
    import rac.engine.prune_step as step
    import rac.engine.sequential as seq
    import rac.models.streaming as streaming
    import rac.pruners.stats as stats

    missing = []
    plan = [(seq, n) for n in ("load_config", "load_calibration", "build_skeleton", "_embed", "materialize", "release",
                               "stats_pass", "output_pass", "prune_group", "_save_step", "_trim_heap",
                               "load_done_groups", "write_hf_folder", "build_provenance")]
    plan += [(step, n) for n in ("prune", "weight_energy", "reconstruction_loss")]
    plan += [(layer, n) for n in ("read_batch", "_write_batch", "layer_forward", "embed_pass")]
    plan += [(output, "write_safetensors_stream"), (ckpt, "save_file")]
    for owner, name in plan:
        if not timers.patch(owner, name):
            missing.append(f"{owner.__name__}.{name}")
    for cls, names in ((act.ActStore, ("read", "write", "commit", "create", "open", "delete")),
                       (stats.HessianAccumulator, ("add",)), (layer.SegmentPlan, ("hessian",)),
                       (layer.LayerKwargs, ("__call__",)), (streaming.WeightFiles, ("load",)),
                       (ckpt.Checkpoints, ("save_step", "load_weights", "drop_acts", "reset"))):
        for n in names:
            if not timers.patch(cls, n, f"{cls.__name__}.{n}"):
                missing.append(f"{cls.__name__}.{n}")
    for mod in [m for name, m in sys.modules.items() if name.startswith("rac.") and m is not None]:
        if callable(getattr(mod, "sha256_file", None)):
            timers.patch(mod, "sha256_file")
    timers.patch(os, "fsync", "os.fsync")
    timers.patch(gc, "collect", "gc.collect")
    if memory._LIBC is not None:
        memory._LIBC = _Libc(memory._LIBC, timers)  # type: ignore[assignment]
    return missing


def timers_child(args: dict[str, Any]) -> dict[str, Any]:
    """One instrumented compress; the timer totals plus the whole-region measurements."""
    import torch

    from rac.engine import CompressConfig, compress

    meter = Meter()
    torch.set_num_threads(int(args["threads"]))
    cfg = CompressConfig.model_validate(args["cfg"])
    timers = Timers()
    missing = instrument(timers)
    if args.get("no_replay"):
        _without_replay()
    run = timers.wrap("compress", compress)
    meter.start()
    res = run(Path(args["model"]), Path(args["calib"]), Path(args["out"]), cfg, Path(args["work"]))
    return meter.result(timers=timers.as_json(), missing=missing, n_tokens=res.n_tokens,
                        cfg=cfg.canonical())


def _without_replay() -> None:
    """Experiment: no adapter names a replayable sub-block, so group order recomputes every pass from the
    layer input (the engine before `rac.engine.replay`; the same pruned weights)."""
    import dataclasses

    from rac.models import adapters

    for name, adapter in list(adapters.ADAPTERS.items()):
        adapters.ADAPTERS[name] = dataclasses.replace(adapter, blocks=())


EXPERIMENTS: tuple[tuple[str, dict[str, str], dict[str, Any]], ...] = (  # (label, extra env, extra child args)
    ("no sub-block replay (every group pass recomputes the layer from its input)", {}, {"no_replay": True}),
    ("no huge pages for torch's CPU tensors (THP_MEM_ALLOC_ENABLE=0)", {"THP_MEM_ALLOC_ENABLE": "0"}, {}),
    ("glibc mmap threshold 64 MiB instead of 4 MiB (MALLOC_MMAP_THRESHOLD_=67108864)",
     {"MALLOC_MMAP_THRESHOLD_": str(64 << 20)}, {}),
)


def ensure_pyspy() -> Path:
    """py-spy in its own venv under bench/.cache/tools (built on first use)."""
    if not PYSPY.exists():
        subprocess.run(["python3", "-m", "venv", str(TOOLS)], check=True)
        subprocess.run([str(TOOLS / "bin" / "python"), "-m", "pip", "install", "-q", PYSPY_PIN], check=True)
    return PYSPY


def sampled(cmd: list[str], env: dict[str, str], raw_out: Path, cwd: Path) -> tuple[dict[str, Any], float]:
    """Run `cmd` under py-spy (native frames, SAMPLE_HZ); its result line and the wall time of the process."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(ensure_pyspy()), "record", "--native", "-r", str(SAMPLE_HZ), "-f", "raw", "-o",
                           str(raw_out), "--", *cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"sampled run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return parse(proc.stdout), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    from bench.peer import PEER_PY, RESULTS, ROOT, _child_env, _source, rac_configs, rac_label, run_child
    from bench.peer_data import CACHE, SetsSpec, build_sets
    from bench.peer_profile_report import profile_markdown, summarize_samples
    from bench.solvers import machine, write_atomic
    from rac.models.assets import resolve_model

    a = _parse(argv)
    spec = SetsSpec(calib_prompts=16, calib_tokens=3000, heldout_prompts=8, max_new_tokens=128) if a.quick \
        else SetsSpec()
    model = resolve_model("smollm2-135m")
    sets = build_sets(model, spec)
    res: dict[str, Any] = {"command": " ".join(["python -m bench.peer_profile", *(argv or sys.argv[1:])]),
                           "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "threads": a.threads, "sets": sets.info, "runs": [], "source": _source()}
    tmp = Path(tempfile.mkdtemp(prefix="rac-bench-profile-"))
    env = _child_env(a.threads)
    try:
        for variant, cfg in [vc for vc in rac_configs(a.method, a.variants.split(","))]:
            args = {"model": str(model), "calib": str(sets.calib), "out": str(tmp / "out"), "work": str(tmp / "work"),
                    "cfg": cfg.canonical(), "threads": a.threads}
            run: dict[str, Any] = {"tool": "rac", "variant": variant, "label": rac_label(cfg)}
            run["timers"] = run_child("rac", {"kind": "timers", **args}, a.threads, module="bench.peer_profile")
            _clean(tmp)
            cmd = [sys.executable, "-m", "bench.peer_rac", json.dumps({"kind": "compress", **args})]
            load0 = os.getloadavg()[0]
            run["sampled"], run["sampled_process_s"] = sampled(cmd, env, tmp / "spy.txt", ROOT)
            run["samples"] = summarize_samples(tmp / "spy.txt", ("rac/",), SAMPLE_HZ)
            run["sampled_load"] = [load0, os.getloadavg()[0]]
            _clean(tmp)
            res["runs"].append(run)
            print(f"  profiled {run['label']}", flush=True)
            if variant == "default" and not a.no_experiments:
                run["experiments"] = []
                for label, extra_env, extra_args in EXPERIMENTS:
                    exp = run_child("rac", {"kind": "timers", **args, **extra_args}, a.threads,
                                    module="bench.peer_profile", extra_env=extra_env)
                    exp["label"] = label
                    run["experiments"].append(exp)
                    _clean(tmp)
                    print(f"  experiment {label}: {exp['wall_s']:.1f} s", flush=True)
        if not a.no_peer:
            pargs = {"kind": "oneshot", "model": str(model), "calib": str(sets.calib_export), "out": str(tmp / "out"),
                     "method": "sparsegpt", "sparsity": 0.5, "nm": None, "threads": a.threads}
            cmd = [str(PEER_PY), "-m", "bench.peer_child", json.dumps(pargs)]
            peer: dict[str, Any] = {"tool": "llm-compressor", "label": "llm-compressor oneshot (float32)"}
            peer["sampled"], peer["sampled_process_s"] = sampled(cmd, env, tmp / "spy.txt", ROOT)
            peer["samples"] = summarize_samples(tmp / "spy.txt", ("llmcompressor/", "compressed_tensors/"), SAMPLE_HZ)
            res["peer"] = peer
            _clean(tmp)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out = a.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "profile.md", profile_markdown(res))
    raw = CACHE / ("profile-quick.json" if a.quick else "profile.json")
    raw.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out / 'profile.md'} (raw numbers: {raw})")


def _clean(tmp: Path) -> None:
    import shutil

    for name in ("out", "work"):
        shutil.rmtree(tmp / name, ignore_errors=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method", default="sgpt50")
    p.add_argument("--variants", default="default,layer")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-experiments", action="store_true", help="skip the allocator / gc experiments")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # a child: run_child passes one JSON argument
        emit(timers_child(json.loads(sys.argv[1])))
    else:
        main()
