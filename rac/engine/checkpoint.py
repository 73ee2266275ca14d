"""Per-step checkpoints of the sequential engine under ``<work_dir>/engine/``, and the records it reports.

Files (each written to a temp file in the same folder, fsynced and renamed):
  state.json                       fingerprint of (model, calibration, config, rac version) of the run
  step-LLLLL-G.safetensors         pruned weights of group G of layer L (storage dtype)
  step-LLLLL-G.json                the `StepRecord` of that step (with the sha256 of the files above)
  acts-LLLLL.bin (+ .json)         activations entering layer L (see `rac.engine.actstore`)
A step (L, G) is done when its .json exists. Resuming refuses a work dir whose fingerprint differs.
`resume_point` is the one rule for where an interrupted compression continues (used by the pipeline,
which trusts what its index verified, and by the torchrun entry point, which trusts the step records).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rac.pruners.quant import QuantizedWeight, QuantSpec
from rac.store.artifacts import atomic_path, atomic_write_text, sha256_file

Step = tuple[int, int]
# a quantized linear <m> is checkpointed as <m>.weight (Ŵ, storage dtype) plus its codes and scales:
QUANT_SUFFIXES = ("weight_codes", "weight_scales", "weight_groups")  # int8 [out, in], f32 [out, G], i32 [in]


def quant_checkpoint_tensors(module: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a quantized linear `module` (codes, scales, and g_idx with act order)."""
    out = {f"{module}.weight_codes": qw.q, f"{module}.weight_scales": qw.scale}
    if qw.g_idx is not None:
        out[f"{module}.weight_groups"] = qw.g_idx
    return out


def quant_from_checkpoint(module: str, tensors: Mapping[str, torch.Tensor], spec: QuantSpec) -> QuantizedWeight:
    """The `QuantizedWeight` of `module` back from its step's checkpoint tensors (ValueError if absent)."""
    codes, scales = tensors.get(f"{module}.weight_codes"), tensors.get(f"{module}.weight_scales")
    if codes is None or scales is None:
        raise ValueError(f"checkpoint has no codes/scales for quantized linear {module!r}")
    return QuantizedWeight(q=codes, scale=scales, g_idx=tensors.get(f"{module}.weight_groups"), spec=spec)


def resume_point(done: Callable[[int, int], bool], has_acts: Callable[[int], bool], n_layers: int,
                 n_groups: int) -> Step | None:
    """Where an interrupted compression continues: the first (layer, group) step that `done` does not vouch
    for, walking in order; (n_layers, 0) when every step is done (only the output is left to write).

    That step needs the activations entering its layer (`has_acts(layer)`); None means start over (nothing
    done yet, or those activations are gone).
    """
    step: Step = (n_layers, 0)
    for layer in range(n_layers):
        missing = [g for g in range(n_groups) if not done(layer, g)]
        if missing:
            step = (layer, missing[0])
            break
    if step == (0, 0) or (step[0] < n_layers and not has_acts(step[0])):
        return None
    return step


@dataclass(frozen=True)
class LinearRecord:
    """Outcome of pruning one linear."""

    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    shape: tuple[int, int]  # [out_features, in_features]
    sparsity: float  # achieved share of exact zeros
    rel_error: float  # loss / tr(W H W^T) (NaN when the input energy is 0)
    loss: float  # tr(dW H dW^T) of the pruner's float32 solution (before the cast to the storage dtype)
    damp: float  # damping actually used
    retries: int  # number of failed attempts before success
    retry_log: tuple[str, ...]  # one line per failed attempt
    seconds: float
    tokens: int  # calibration tokens behind H


@dataclass(frozen=True)
class ExpertRecord:
    """One expert of a MoE layer in one step: its calibration coverage and how its linears were pruned."""

    expert: int
    segment_tokens: dict[str, int]  # real calibration tokens the router sent to it, per segment (all segments)
    tokens: int  # tokens behind its Hessian (the kept segments)
    treatment: str  # "hessian", or the low-token treatment of rac.engine.experts (e.g. "magnitude")


@dataclass(frozen=True)
class CheckpointFile:
    """A persisted checkpoint file with its content hash."""

    path: Path
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> CheckpointFile:
        return cls(Path(path), sha256_file(path), Path(path).stat().st_size)


@dataclass(frozen=True)
class StepRecord:
    """One (layer, group) step: its pruned linears and the checkpoint files that persist it."""

    layer: int
    group: int
    linears: tuple[LinearRecord, ...]
    files: tuple[CheckpointFile, ...]
    seconds: float
    experts: tuple[ExpertRecord, ...] = ()  # MoE layers: the experts whose linears this step pruned

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = [{"path": str(f.path), "sha256": f.sha256, "bytes": f.bytes} for f in self.files]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StepRecord:
        linears = tuple(
            LinearRecord(**{**x, "shape": tuple(x["shape"]), "retry_log": tuple(x["retry_log"])})
            for x in d["linears"]
        )
        files = tuple(CheckpointFile(Path(f["path"]), f["sha256"], int(f["bytes"])) for f in d["files"])
        experts = tuple(ExpertRecord(**x) for x in d.get("experts", ()))
        return cls(int(d["layer"]), int(d["group"]), linears, files, float(d["seconds"]), experts)


class Checkpoints:
    """The engine's folder of step checkpoints and boundary activations inside a work dir.

    `acts_dir` (default: the same folder) holds the activation stores: a data-parallel rank keeps its own
    there (`rac.engine.distributed`), while the step files are shared.
    """

    def __init__(self, work_dir: Path, acts_dir: Path | None = None) -> None:
        self.root = Path(work_dir) / "engine"
        self.acts_root = Path(acts_dir) if acts_dir is not None else self.root

    def weights_path(self, layer: int, group: int) -> Path:
        return self.root / f"step-{layer:05d}-{group}.safetensors"

    def record_path(self, layer: int, group: int) -> Path:
        return self.root / f"step-{layer:05d}-{group}.json"

    def acts_path(self, layer: int) -> Path:
        """Activation store holding the inputs of decoder layer `layer`."""
        return self.acts_root / f"acts-{layer:05d}.bin"

    def drop_acts(self, layer: int) -> None:
        """Delete the activation store entering `layer` (data, sidecar, temp files) if present."""
        data = self.acts_path(layer)
        for p in (data, Path(str(data) + ".json")):
            p.unlink(missing_ok=True)
        for tmp in data.parent.glob(f".{data.name}.tmp-*"):
            tmp.unlink(missing_ok=True)

    def reset(self, fingerprint: Mapping[str, Any]) -> None:
        """Start afresh: wipe the folder and record the run's fingerprint."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        atomic_write_text(self.root / "state.json", json.dumps(dict(fingerprint), sort_keys=True, indent=1))

    def verify(self, fingerprint: Mapping[str, Any]) -> None:
        """ValueError naming every fingerprint key that differs from the recorded run (or if none exists)."""
        state = self.root / "state.json"
        if not state.is_file():
            raise ValueError(f"cannot resume: no engine checkpoint state in {self.root}")
        old = json.loads(state.read_text())
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            raise ValueError(f"cannot resume from {self.root}: {diff} differ from the checkpointed run")

    def save_step(self, layer: int, group: int, tensors: Mapping[str, torch.Tensor],
                  record: StepRecord, extra_files: tuple[Path, ...] = ()) -> StepRecord:
        """Persist the group's pruned weights, then its record (with file hashes); returns the full record."""
        path = self.weights_path(layer, group)
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"layer": str(layer), "group": str(group)})
        files = tuple(CheckpointFile.of(p) for p in (path, *extra_files))
        full = replace(record, files=files)
        atomic_write_text(self.record_path(layer, group), json.dumps(full.to_json(), indent=1))
        return full

    def load_record(self, layer: int, group: int) -> StepRecord:
        """The persisted record of a done step (ValueError if missing)."""
        path = self.record_path(layer, group)
        if not path.is_file():
            raise ValueError(f"step ({layer}, {group}) has no checkpoint record at {path}")
        return StepRecord.from_json(json.loads(path.read_text()))

    def load_weights(self, layer: int, group: int) -> dict[str, torch.Tensor]:
        """Pruned tensors of a done step, verified against the sha256 in its record."""
        record = self.load_record(layer, group)
        path = self.weights_path(layer, group)
        expected = next((f.sha256 for f in record.files if f.path.name == path.name), None)
        if not path.is_file() or sha256_file(path) != expected:
            raise ValueError(f"checkpoint {path} is missing or does not match its recorded sha256")
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
