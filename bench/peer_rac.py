"""The rac side of `bench.peer`: one measurement per fresh process in the project venv.

    .venv/bin/python -m bench.peer_rac '{"kind": "solver" | "compress", ...}'

  solver    rac's `sparsegpt(W, H, cfg)` (rac/pruners/sparsegpt.py) on W, H read from a safetensors file, the
            best of `repeats` wall times; the last result is written to `out` for the parent to score.
  compress  `rac.engine.compress` (the library entry `rac run` uses) on the model folder and the calibration
            Parquet; the measured region is the whole call (calibration load, statistics, solver, propagation,
            checkpoints, output folder). Solver seconds are the sum of the per-linear `seconds` of its step
            records (the provenance's numbers).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import bench  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)
from bench.peer_proc import Meter, emit


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import rac

    return {"rac": rac.__version__, "torch": version("torch"), "transformers": version("transformers")}


def solver(args: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """Time rac's SparseGPT on one fixed problem."""
    import torch
    from safetensors.torch import load_file, save_file

    from rac.pruners import PruneConfig, sparsegpt

    torch.set_num_threads(int(args["threads"]))
    tensors = load_file(args["problem"])
    W, H = tensors["W"], tensors["H"]
    cfg = PruneConfig.model_validate(args["cfg"])
    meter.start()
    times, res = [], None
    for _ in range(int(args["repeats"])):
        t0 = time.perf_counter()
        res = sparsegpt(W, H, cfg)
        times.append(time.perf_counter() - t0)
    assert res is not None
    save_file({"W_hat": res.weight.contiguous()}, args["out"])
    return meter.result(seconds=min(times), times=times, solver_loss=res.loss, cfg=cfg.canonical(),
                        versions=_versions(), torch_threads=torch.get_num_threads())


def compress_run(args: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """rac's compress on the benchmark's calibration set; writes the pruned model to `out`."""
    import torch

    from rac.engine import CompressConfig, compress
    from rac.engine.checkpoint import StepRecord

    torch.set_num_threads(int(args["threads"]))
    cfg = CompressConfig.model_validate(args["cfg"])
    steps: list[StepRecord] = []
    meter.start()
    res = compress(Path(args["model"]), Path(args["calib"]), Path(args["out"]), cfg, Path(args["work"]),
                   on_step=steps.append)
    solver_s = sum(lin.seconds for s in steps for lin in s.linears)
    return meter.result(solver_s=solver_s, solver_calls=sum(len(s.linears) for s in steps), n_tokens=res.n_tokens,
                        cfg=cfg.canonical(), versions=_versions(), torch_threads=torch.get_num_threads())


def main(argv: list[str]) -> None:
    meter = Meter()
    args = json.loads(argv[1])
    if args["kind"] == "solver":
        emit(solver(args, meter))
    elif args["kind"] == "compress":
        emit(compress_run(args, meter))
    else:
        raise SystemExit(f"unknown kind {args['kind']!r}; known: solver, compress")


if __name__ == "__main__":
    main(sys.argv)
