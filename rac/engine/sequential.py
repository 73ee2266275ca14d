"""Sequential layer-wise compression of a HF decoder model, streamed one decoder layer at a time.

`compress` walks steps (layer, group) in order. A layer's weights are materialised from the safetensors
shards, the hidden states entering it are read from a disk-backed activation store, and for each group of
linears (`[q,k,v] -> [o] -> [gate,up] -> [down]`) a Hessian H = sum_s w_s H_s is formed from per-segment
accumulators and handed to the pruner (`rac.pruners.prune`). Two orders:
  sequential="group" (default): the statistics of group g are collected with groups < g already pruned;
  sequential="layer": all groups' statistics come from the dense layer in one pass (Wanda's and magnitude's
  default, on diag H only: `CompressConfig.order`, `diag_statistics`).
The pruned layer's outputs become the next layer's inputs. In group order, finished sub-blocks are
replayed instead of recomputed in the layer's later passes (`rac.engine.replay`; bitwise the same).

After every step the group's pruned weights (and after a layer's last group the next boundary activations)
are persisted under `work_dir`, then `on_step(StepRecord)` is called. `start_at=(layer, group)` (the first
step not yet done) resumes from those checkpoints; `stop_after` ends a run early (nothing written to
`out_dir`). The finished model is written as a HF folder with `rac_provenance.json`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import rac
from rac.config import StageConfig
from rac.dtypes import slow_bf16_warning, torch_dtype
from rac.engine.actstore import ActStore
from rac.engine.allocation import Allocation, check_allocation, prepare_allocation
from rac.engine.batches import Calibration, load_calibration
from rac.engine.checkpoint import (
    Checkpoints,
    ExpertRecord,
    LinearRecord,
    Step,
    StepRecord,
)
from rac.engine.compress_config import CompressConfig
from rac.engine.experts import (
    ExpertStats,
    expert_chunks,
    expert_members,
    expert_provenance,
    pass_members,
)
from rac.engine.layer import LayerKwargs, SegmentPlan, embed_pass, output_pass, stats_pass
from rac.engine.memory import freeze_new_objects as _freeze_new_objects
from rac.engine.memory import memory_hygiene as _memory_hygiene
from rac.engine.memory import trim_heap as _trim_heap
from rac.engine.output import build_provenance, check_out_dir, write_model
from rac.engine.prune_step import PruneRun, load_done_groups, prune_group
from rac.engine.replay import LayerReplay
from rac.models.adapters import (
    decoder_layers,
    get_submodule,
    select_groups,
)
from rac.models.moe import layer_candidates, materialize_layer
from rac.models.streaming import WeightFiles, build_skeleton, load_config, materialize, release
from rac.pruners.stats import HessianAccumulator

if TYPE_CHECKING:
    from rac.engine.distributed import DistContext



@dataclass(frozen=True)
class CompressResult:
    """Outcome of `compress`: the output folder (None when stopped early) and this run's steps."""

    out_dir: Path | None
    complete: bool
    steps: tuple[StepRecord, ...]
    next_step: Step | None  # first step not done (None when complete)
    n_tokens: int
    seconds: float
    allocation: Allocation | None = None  # per-layer sparsities (prune.allocation non-uniform)


def _check_step(step: Step | None, n_layers: int, n_groups: int, what: str) -> Step | None:
    if step is None:
        return None
    layer, group = step
    if not (0 <= layer <= n_layers and 0 <= group < n_groups) or (layer == n_layers and group != 0):
        raise ValueError(f"{what}={step} out of range: layers 0..{n_layers - 1}, groups 0..{n_groups - 1}")
    return (int(layer), int(group))


def _collect(run: PruneRun, module: torch.nn.Module, layer: int, groups: dict[int, tuple[str, ...]], src: ActStore,
             chunk: frozenset[int] | None = None, plain: bool = True,
             replay: LayerReplay | None = None) -> tuple[dict[int, HessianAccumulator], ExpertStats | None]:
    """One statistics pass: the plain linears' group Hessians (if `plain`) and, in a MoE layer, those of
    the selected experts of `groups` (of `chunk` only, when given); finished blocks replayed from `replay`."""
    spec = run.adapter.moe
    hooked, members = pass_members(spec, {g: run.table[layer][g] for g in groups}, groups, chunk, plain)
    experts = ExpertStats(module, spec, members, run.plan, run.cfg.moe.weighting) if spec and members else None
    rp = replay.plan(min(groups), [n for v in hooked.values() for n in v], experts is not None) if replay else None
    accs = stats_pass(module, layer, hooked, run.calib, src, run.kwargs, run.dtype, run.device, run.plan, experts, rp)
    return _reduced(run, accs), experts


def _reduced(run: PruneRun, accs: dict[int, HessianAccumulator]) -> dict[int, HessianAccumulator]:
    """The accumulators summed over data-parallel ranks (in place; as they are in one process)."""
    if run.dist is not None:
        for g in sorted(accs):
            run.dist.all_reduce(accs[g])
    return accs


def _save_step(run: PruneRun, record: StepRecord, tensors: dict[str, torch.Tensor],
               extra: tuple[Path, ...]) -> StepRecord:
    """Persist a step and report it. Data-parallel: once every rank has committed its activations, rank 0
    writes the step files and reports; a second barrier keeps ranks from dropping stores before that."""
    if run.dist is not None:
        run.dist.barrier()
    if run.dist is None or run.dist.is_main:
        record = run.ckpt.save_step(record.layer, record.group, tensors, record, extra)
        if run.on_step is not None:
            run.on_step(record)
    if run.dist is not None:
        run.dist.barrier()
    return record


def _run_layer(run: PruneRun, layer: int, first_group: int, stop_after: Step | None) -> tuple[list[StepRecord], bool]:
    """Steps (layer, first_group..last) of one layer; returns their records and whether stop_after hit."""
    module = decoder_layers(run.model, run.adapter)[layer]
    materialize_layer(module, run.adapter.layer_prefix(layer), run.files, run.adapter.moe, run.dtype, run.device)
    src = ActStore.open(run.ckpt.acts_path(layer))
    groups = run.layout[layer]
    todo = {g: groups[g] for g in range(first_group, len(groups)) if run.table[layer][g]}
    replay = LayerReplay(module, run.adapter, run.table[layer], len(run.calib.batches), run.ckpt.acts_root) \
        if run.cfg.order == "group" else None
    t_prev = time.perf_counter()  # step seconds run from the previous step's end (stats pass included)
    accs: dict[int, HessianAccumulator] = {}
    experts: ExpertStats | None = None
    if run.cfg.order == "layer" and todo:  # dense statistics, before any pruned weight is loaded
        accs, experts = _collect(run, module, layer, todo, src)
        _trim_heap()
    load_done_groups(run, layer, first_group, module)
    done: list[StepRecord] = []
    for g in range(first_group, len(groups)):
        tensors: dict[str, torch.Tensor] = {}
        records: list[LinearRecord] = []
        expert_records: list[ExpertRecord] = []
        if g in todo:
            chunks = expert_chunks(list(expert_members(run.adapter.moe, run.table[layer][g])),
                                   run.cfg.moe.experts_per_pass)  # [None] in layer order (validated)
            for i, chunk in enumerate(chunks):  # one pass, or one per chunk of experts (plain linears in the first)
                if run.cfg.order == "group":
                    accs, experts = _collect(run, module, layer, {g: groups[g]}, src, chunk, i == 0, replay)
                    _trim_heap()
                t, r, x = prune_group(run, layer, g, module, accs.pop(g, None), experts)
                tensors, records, expert_records = {**tensors, **t}, records + r, expert_records + x
            if run.dist is not None:
                run.dist.check_same(tensors, f"layer {layer} group {g}")
        extra: tuple[Path, ...] = ()
        if g == len(groups) - 1:
            dst = ActStore.create(run.ckpt.acts_path(layer + 1), run.calib.n_tokens, src.spec.hidden,
                                  run.cfg.act_dtype)
            output_pass(module, layer, run.calib, src, dst, run.kwargs, run.dtype, run.device,
                        replay.plan(len(groups), record=False) if replay else None)
            dst.commit()
            extra = (dst.path, ActStore.sidecar(dst.path))
        record = _save_step(run, StepRecord(layer, g, tuple(records), (), time.perf_counter() - t_prev,
                                            tuple(expert_records)), tensors, extra)
        done.append(record)
        if g == len(groups) - 1:
            run.ckpt.drop_acts(layer)  # only after the step is reported: a resume at (layer, last) still finds it
        _trim_heap(collect=True)
        t_prev = time.perf_counter()
        if stop_after == (layer, g):
            break
    if replay is not None:
        replay.close()
    release(module)
    return done, stop_after == (layer, g)


def _embed(run: PruneRun, hidden: int) -> None:
    """Write the activation store entering layer 0 (embeddings materialised just for this)."""
    embed = get_submodule(run.model, run.adapter.embed)
    materialize(embed, run.adapter.embed + ".", run.files, run.dtype, run.device)
    dst = ActStore.create(run.ckpt.acts_path(0), run.calib.n_tokens, hidden, run.cfg.act_dtype)
    embed_pass(run.model, run.adapter, run.calib, dst, run.device)
    dst.commit()
    release(embed)
    _trim_heap()


def _fingerprint(cfg: CompressConfig, files: WeightFiles, calib: Calibration) -> dict[str, str]:
    return {"model": files.fingerprint(), "calibration": calib.sha256, "config": cfg.stable_hash(),
            "rac_version": rac.__version__}


def compress(
    model_dir: Path,
    calib_path: Path,
    out_dir: Path,
    cfg: CompressConfig,
    work_dir: Path,
    start_at: Step | None = None,
    stop_after: Step | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    stage_configs: Mapping[str, StageConfig] | None = None,
    dist: DistContext | None = None,
) -> CompressResult:
    """Prune `model_dir` on the calibration set at `calib_path` and write the HF folder `out_dir`.

    `start_at=(layer, group)` is the first step not yet done (its checkpoints must be in `work_dir`);
    `stop_after=(layer, group)` returns right after that step is persisted. `on_step` is called after
    each step's checkpoint is on disk. `stage_configs` (e.g. the calibration stage's config) are recorded
    in the provenance beside this config. Bad input raises ValueError before anything is written.
    `dist`: run as one data-parallel rank (see `rac.engine.distributed`; only rank 0 writes `out_dir`, reports
    steps and returns `out_dir`).
    """
    with _memory_hygiene():
        return _compress(Path(model_dir), Path(calib_path), Path(out_dir), cfg, Path(work_dir), start_at,
                         stop_after, on_step, stage_configs or {}, dist)


def _compress(model_dir: Path, calib_path: Path, out_dir: Path, cfg: CompressConfig, work_dir: Path,
              start_at: Step | None, stop_after: Step | None, on_step: Callable[[StepRecord], None] | None,
              stage_configs: Mapping[str, StageConfig], dist: DistContext | None) -> CompressResult:
    t_start = time.perf_counter()
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    check_out_dir(out_dir)
    config, adapter = load_config(Path(model_dir), cfg.trust_remote_code)
    if adapter.moe is not None and cfg.prune.quant is not None:
        raise ValueError(f"quant={cfg.prune.quant.label} is not supported for mixture-of-experts models yet "
                         f"(model_type {config.model_type!r}): prune without quant")
    check_allocation(cfg.prune, adapter.moe is not None, dist is not None)
    files = WeightFiles(Path(model_dir))
    n_layers, n_groups = int(config.num_hidden_layers), len(adapter.groups)
    start = _check_step(start_at, n_layers, n_groups, "start_at") or (0, 0)
    stop = _check_step(stop_after, n_layers, n_groups, "stop_after")
    layout = [list(adapter.groups)] * n_layers
    if adapter.moe is not None:  # templates expanded over each layer's experts, absent names dropped
        layout = layer_candidates(adapter, n_layers, files.names())
        if dist is not None:
            raise ValueError(f"data-parallel compression of mixture-of-experts models ({adapter.family}) "
                             "is not supported: run it in one process")
    table = select_groups(adapter, n_layers, cfg.include, cfg.exclude, layout if adapter.moe else None)
    max_len = int(getattr(config, "max_position_embeddings", 0) or 2**31)
    full = load_calibration(Path(calib_path), int(config.vocab_size), max_len, cfg.batch_tokens)
    calib = full if dist is None else dist.shard(full, cfg.batch_tokens)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    device, dtype = torch.device(cfg.device), torch_dtype(cfg.compute_dtype)
    slow = slow_bf16_warning(dtype, device, "compress.compute_dtype")
    if slow is not None:
        warnings.warn(slow, stacklevel=3)
    present = [s for s, n in full.segment_tokens().items() if n > 0]  # the same plan on every rank
    plan = SegmentPlan.build(cfg.segment_weights, present, device, cfg.diag_statistics)
    model = build_skeleton(config, cfg.trust_remote_code)
    _freeze_new_objects()
    ckpt = Checkpoints(work_dir) if dist is None else dist.checkpoints(work_dir)
    fingerprint = _fingerprint(cfg, files, calib)
    if start == (0, 0) and (dist is None or dist.is_main):
        ckpt.reset(fingerprint)
    if dist is not None:
        dist.barrier()  # rank 0's reset wipes the folder before any rank writes its stores
        ckpt.acts_root.mkdir(parents=True, exist_ok=True)
    if start != (0, 0):
        ckpt.verify(fingerprint)
    if adapter.rotary is not None:
        get_submodule(model, adapter.rotary).to(device)  # real buffers (inv_freq), no weights
    run = PruneRun(cfg, files, adapter, model, calib, ckpt, table, layout,
               LayerKwargs(model, adapter, int(config.hidden_size), dtype, device), plan, device, dtype, on_step, dist)
    if start == (0, 0):
        _embed(run, int(config.hidden_size))
    run.allocation = prepare_allocation(run, fresh=start == (0, 0))  # OWL's dense pre-pass, or read back
    steps: list[StepRecord] = []
    for layer in range(start[0], n_layers):
        records, stopped = _run_layer(run, layer, start[1] if layer == start[0] else 0, stop)
        steps.extend(records)
        if stopped:
            last = steps[-1]
            nxt = (last.layer, last.group + 1) if last.group + 1 < n_groups else (last.layer + 1, 0)
            return CompressResult(None, False, tuple(steps), nxt, full.n_tokens, time.perf_counter() - t_start,
                                  run.allocation)
    if dist is not None and not dist.is_main:
        ckpt.drop_acts(n_layers)
        dist.barrier()  # returns once rank 0 has written the output
        return CompressResult(None, True, tuple(steps), None, full.n_tokens, time.perf_counter() - t_start)
    every = [ckpt.load_record(layer, g) for layer in range(n_layers) for g in range(n_groups)]
    provenance = build_provenance(cfg, stage_configs, files, full, every, time.perf_counter() - t_start)
    if adapter.moe is not None:
        provenance["experts"] = expert_provenance(every, cfg.moe)
    if run.allocation is not None:
        provenance["allocation"] = run.allocation.to_json()
    linears = [n for n, m in run.model.named_modules() if isinstance(m, torch.nn.Linear)]
    write_model(files, ckpt, every, out_dir, provenance, cfg.prune.quant, linears)
    ckpt.drop_acts(n_layers)  # the final boundary feeds nothing: free its disk
    if dist is not None:
        dist.barrier()
    return CompressResult(out_dir, True, tuple(steps), None, full.n_tokens, time.perf_counter() - t_start,
                          run.allocation)
