"""The torchrun entry point of data-parallel `compress` (the rank context is `rac.engine.distributed`).

    torchrun --nproc_per_node N -m rac.engine.torchrun MODEL CALIB OUT --config cfg.json --work-dir W

Every rank runs this; it resumes from the step records in --work-dir (`rac.engine.checkpoint.resume_point`,
a step counting as done when its record exists; every rank must still hold the activations entering the
resume step's layer, else all ranks start over).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist
import yaml

from rac.engine.checkpoint import Step, resume_point
from rac.engine.distributed import DistContext
from rac.engine.sequential import CompressConfig, compress
from rac.models.streaming import load_config


def dist_resume_point(ctx: DistContext, work_dir: Path, n_layers: int, n_groups: int) -> Step | None:
    """The resume step of a data-parallel run (the same on every rank), None to start over."""
    ckpt = ctx.checkpoints(work_dir)
    if not (ckpt.root / "state.json").is_file():
        return None
    return resume_point(lambda layer, g: ckpt.record_path(layer, g).is_file(),
                        lambda layer: ctx.all_min(int(ckpt.acts_path(layer).is_file())) == 1, n_layers, n_groups)


def _parse_step(text: str | None) -> Step | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"a step is 'layer,group' (e.g. 3,1), got {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: data-parallel `compress` of MODEL on CALIB into OUT (resumes from --work-dir)."""
    ap = argparse.ArgumentParser(prog="python -m rac.engine.torchrun", description=main.__doc__)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--config", type=Path, required=True, help="CompressConfig as JSON or YAML")
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    ap.add_argument("--stop-after", default=None, help="layer,group: stop after this step (tests, staging)")
    ap.add_argument("--fresh", action="store_true", help="ignore checkpoints in --work-dir and start over")
    args = ap.parse_args(argv)
    cfg = CompressConfig(**yaml.safe_load(args.config.read_text()))
    ctx = DistContext.from_env(args.backend)
    try:
        config, adapter = load_config(args.model_dir, cfg.trust_remote_code)
        start = None if args.fresh else dist_resume_point(ctx, args.work_dir, int(config.num_hidden_layers),
                                                           len(adapter.groups))
        res = compress(args.model_dir, args.calib, args.out_dir, cfg, args.work_dir, start_at=start,
                       stop_after=_parse_step(args.stop_after), dist=ctx)
        if ctx.is_main:
            print(json.dumps({"out_dir": str(res.out_dir) if res.out_dir else None, "complete": res.complete,
                              "start_at": start, "steps": len(res.steps), "n_tokens": res.n_tokens,
                              "seconds": round(res.seconds, 3), "world": ctx.world}))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
