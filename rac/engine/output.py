"""Write the pruned model as a standard Hugging Face folder plus `rac_provenance.json`.

The folder holds every non-weight file of the source (config, generation config, tokenizer files and chat
template; `rac_*` files excepted), sharded safetensors ``model-0000k-of-0000N.safetensors`` with
``model.safetensors.index.json``, and the provenance record. Non-decoder tensors (embeddings, final norm,
LM head) are copied unchanged; pruned linears come from the engine's step checkpoints (`write_model`), quantized
ones in compressed-tensors pack-quantized form (`rac.engine.quantized_folder`).

Shards are written by a streaming safetensors writer (header first, then one tensor at a time), because
`safetensors.torch.save_file` needs every tensor of a shard resident at once; memory stays at one tensor.
Everything goes into a temp folder beside `out_dir` that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import rac
from rac.config import StageConfig
from rac.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES, torch_dtype
from rac.engine.batches import Calibration
from rac.engine.checkpoint import Checkpoints, StepRecord, quant_from_checkpoint
from rac.engine.quantized_folder import folder_specs, quantized_fetch, rewrite_config, size_ratio
from rac.models.streaming import INDEX_NAME, SINGLE_NAME, WeightFiles
from rac.pruners.quant import QuantSpec
from rac.store.artifacts import TEMP_MARK, atomic_dir

PROVENANCE_NAME = "rac_provenance.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")



def nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Byte size of a tensor given its safetensors dtype string and shape."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {dtype!r}; known: {sorted(SAFETENSORS_DTYPES)}")
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()


def write_safetensors_stream(
    path: Path,
    specs: Sequence[tuple[str, str, list[int]]],
    fetch: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor: `specs` = (name, dtype, shape); `fetch(name)` gives the data.

    Each fetched tensor must match its spec exactly (ValueError naming it otherwise). The file is fsynced.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            t = fetch(name)
            if SAFETENSORS_CODES.get(t.dtype) != dtype or list(t.shape) != list(shape):
                raise ValueError(f"tensor {name!r}: got {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _natural_key(name: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def plan_shards(
    specs: Mapping[str, tuple[str, list[int]]], max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[list[str]]:
    """Tensor names (natural order) packed greedily into shards of at most `max_shard_bytes` (a bigger
    tensor gets a shard of its own)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(specs, key=_natural_key):
        n = nbytes(*specs[name])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def copy_side_files(model_dir: Path, dest: Path) -> list[str]:
    """Copy the source's non-weight top-level files (config, tokenizer, templates...); returns their names."""
    copied = []
    for src in sorted(Path(model_dir).iterdir()):
        name = src.name
        if not src.is_file() or name.startswith(("rac_", ".")) or name in (INDEX_NAME, SINGLE_NAME):
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        shutil.copy2(src, dest / name)
        copied.append(name)
    return copied


def write_hf_folder(
    model_dir: Path,
    out_dir: Path,
    specs: Mapping[str, tuple[str, list[int]]],
    fetch: Callable[[str], torch.Tensor],
    provenance: Mapping[str, Any],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    edit_config: Callable[[Path], None] | None = None,
) -> Path:
    """Assemble the HF folder in a temp dir beside `out_dir` and rename it into place; returns `out_dir`.

    `specs` maps every tensor name to (dtype, shape); `fetch(name)` returns its (possibly pruned) data.
    `edit_config(path)` may rewrite the copied config.json in the temp dir (e.g. add a quantization config).
    `out_dir` must not exist or be an empty directory.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}{TEMP_MARK}*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(out_dir) as tmp:
        copy_side_files(model_dir, tmp)
        if edit_config is not None:
            edit_config(tmp / "config.json")
        shards = plan_shards(specs, max_shard_bytes)
        weight_map: dict[str, str] = {}
        for k, names in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors_stream(tmp / fname, [(n, *specs[n]) for n in names], fetch)
            weight_map.update({n: fname for n in names})
        total = sum(nbytes(*specs[n]) for n in specs)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, sort_keys=True))
    return out_dir


def write_model(files: WeightFiles, ckpt: Checkpoints, every: Sequence[StepRecord], out_dir: Path,
                provenance: dict[str, Any], quant: QuantSpec | None, model_linears: Sequence[str]) -> None:
    """Write the HF folder: pruned linears from their step checkpoints, every other tensor from the source.

    With `quant`, the compressed linears are written in compressed-tensors pack-quantized form (codes and
    scales from the checkpoints, scales in `quant.scale_dtype`, as the solver rounded them) and config.json
    gets the quantization config; every other linear of `model_linears` (LM head, excluded ones) stays dense.
    """
    pruned = {lin.name + ".weight": (r.layer, r.group) for r in every for lin in r.linears}
    step_tensors: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def step_of(name: str) -> dict[str, torch.Tensor]:
        step = pruned[name]
        if step not in step_tensors:  # one step file at a time in memory (names arrive layer by layer)
            step_tensors.clear()
            step_tensors[step] = ckpt.load_weights(*step)
        return step_tensors[step]

    def fetch(name: str) -> torch.Tensor:
        return step_of(name)[name] if name in pruned else files.load([name])[name]

    if quant is None:
        write_hf_folder(files.model_dir, out_dir, files.specs, fetch, provenance)
        return
    spec = quant
    linears = sorted(name.removesuffix(".weight") for name in pruned)
    scale_dtype = torch_dtype(spec.scale_dtype)
    ignore = sorted(n for n in model_linears if n not in linears)
    specs = folder_specs(files.specs, linears, spec, scale_dtype)
    provenance["quantization"] = {"scheme": spec.label, **spec.canonical(), "format": "pack-quantized",
                                  "scale_dtype": str(scale_dtype).removeprefix("torch."), "dense_linears": ignore,
                                  "size_ratio": size_ratio(files.specs, linears, spec, scale_dtype)}
    quantized = quantized_fetch(fetch, lambda m: quant_from_checkpoint(m, step_of(m + ".weight"), spec),
                                linears, scale_dtype)
    write_hf_folder(files.model_dir, out_dir, specs, quantized, provenance,
                    edit_config=lambda path: rewrite_config(path, spec, ignore, scale_dtype))


def check_out_dir(out_dir: Path) -> None:
    """ValueError if `out_dir` exists and is not an empty directory (a finished output is never overwritten)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output folder {out_dir} already exists and is not empty")


def build_provenance(
    cfg: StageConfig,
    stage_configs: Mapping[str, StageConfig],
    files: WeightFiles,
    calib: Calibration,
    steps: Sequence[StepRecord],
    seconds: float,
) -> dict[str, Any]:
    """The `rac_provenance.json` record: versions, configs, calibration fingerprint, per-linear outcomes."""
    linears = [{"layer": s.layer, "group": s.group, **asdict(lin)} for s in steps for lin in s.linears]
    zeros = sum(lin.sparsity * lin.shape[0] * lin.shape[1] for s in steps for lin in s.linears)
    total = sum(lin.shape[0] * lin.shape[1] for s in steps for lin in s.linears)
    per_layer: dict[int, float] = {}
    for s in steps:
        per_layer[s.layer] = per_layer.get(s.layer, 0.0) + s.seconds
    return {
        "rac_version": rac.__version__,
        "torch_version": torch.__version__,
        "model": {"path": str(files.model_dir), "fingerprint": files.fingerprint()},
        "stages": {"compress": cfg.canonical(), **{k: v.canonical() for k, v in stage_configs.items()}},
        "calibration": {
            "path": str(calib.path), "sha256": calib.sha256, "sequences": len(calib.input_ids),
            "tokens": calib.n_tokens, "segment_tokens": calib.segment_tokens(), "meta": calib.meta,
        },
        "pruned_linears": len(linears),
        "achieved_sparsity": zeros / total if total else 0.0,
        "linears": linears,
        "layer_seconds": [{"layer": k, "seconds": v} for k, v in sorted(per_layer.items())],
        "seconds": seconds,
    }
