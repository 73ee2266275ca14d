"""Stream a HF safetensors model one module at a time: a meta-device skeleton plus per-module materialisation.

`WeightFiles` maps every tensor name of a model folder to its shard (via ``model.safetensors.index.json``, or
the single ``model.safetensors``) and validates every shard up front: a missing file, a corrupt or truncated
header, or a tensor the index promises but the shard lacks raises `ShardError` naming the file. Tensors are
read through `safetensors.safe_open` (memory-mapped); each read opens the shard, copies the requested tensors
and closes it again, so no mapping of the whole model stays resident.

`build_skeleton` builds the `*ForCausalLM` on the meta device (`accelerate.init_empty_weights`; buffers such as
rotary `inv_freq` stay real), `materialize` loads one submodule's weights into it, `release` sends it back
to meta. Together they keep about one decoder layer's weights in memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from rac.models.adapters import Adapter, get_adapter

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ShardError(ValueError):
    """A weight shard is missing, truncated, corrupt, or lacks a tensor its index names."""


def safetensors_header(path: Path) -> bytes:
    """The 8-byte length prefix plus the JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ShardError(f"safetensors file {str(path)!r} is truncated (no header)")
        (n,) = struct.unpack("<Q", raw)
        header = fh.read(n)
        if len(header) != n:
            raise ShardError(f"safetensors file {str(path)!r} is truncated (header of {n} bytes, {len(header)} read)")
        return raw + header


def model_revision(model_dir: Path) -> str:
    """The model fingerprint: sha256 over config.json, the weights index and every shard's name, size and
    header (not the values: cheap for any model size, and it changes with any re-export)."""
    root = Path(model_dir)
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"model folder {str(root)!r} has no config.json")
    digest = hashlib.sha256(b"config\0" + config.read_bytes())
    index = root / INDEX_NAME
    if index.is_file():
        digest.update(b"index\0" + index.read_bytes())
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"model folder {str(root)!r} has no *.safetensors weights")
    for shard in shards:
        digest.update(f"{shard.name}\0{shard.stat().st_size}\0".encode() + safetensors_header(shard))
    return digest.hexdigest()


class WeightFiles:
    """Validated tensor-name -> shard map of a model folder; reads tensors on demand."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.weight_map = self._weight_map()
        self.specs: dict[str, tuple[str, list[int]]] = {}
        by_file: dict[str, list[str]] = defaultdict(list)
        for name, fname in self.weight_map.items():
            by_file[fname].append(name)
        for fname, names in sorted(by_file.items()):
            self._check_shard(fname, names)

    def _weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ShardError(f"{index}: not a valid safetensors index ({exc})") from None
            return {str(k): str(v) for k, v in weight_map.items()}
        single = self.model_dir / SINGLE_NAME
        if not single.is_file():
            raise ShardError(f"{self.model_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        with self._open(SINGLE_NAME) as f:
            return {name: SINGLE_NAME for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__

    def _open(self, fname: str) -> Any:
        path = self.model_dir / fname
        if not path.is_file():
            raise ShardError(f"missing weight shard {path}")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own SafetensorError (truncated / bad header)
            raise ShardError(f"corrupt weight shard {path}: {exc}") from None

    def _check_shard(self, fname: str, names: list[str]) -> None:
        with self._open(fname) as f:
            present = set(f.keys())
            missing = sorted(set(names) - present)
            if missing:
                raise ShardError(f"weight shard {self.model_dir / fname} lacks {missing[:5]} named by its index")
            for name in names:
                sl = f.get_slice(name)
                self.specs[name] = (sl.get_dtype(), list(sl.get_shape()))

    def names(self) -> list[str]:
        """All tensor names, in index order."""
        return list(self.weight_map)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors (original dtype), each shard opened once and closed after."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise ShardError(f"tensor {name!r} not found in {self.model_dir}")
            by_file[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for fname, group in by_file.items():
            with self._open(fname) as f:
                for name in group:
                    out[name] = f.get_tensor(name)
        return out

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with `prefix`, keyed by the rest of the name."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return {n[len(prefix) :]: t for n, t in self.load(names).items()}

    def fingerprint(self) -> str:
        """This folder's `model_revision`."""
        return model_revision(self.model_dir)


def load_config(model_dir: Path, trust_remote_code: bool = False) -> tuple[PretrainedConfig, Adapter]:
    """The model's HF config and its adapter (UnsupportedArchitectureError for an unknown model_type)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"model folder {model_dir} has no config.json")
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return config, get_adapter(config.model_type)


def build_skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM with every parameter on the meta device (non-persistent buffers stay real)."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.eval()
    return model


def materialize(
    module: nn.Module, prefix: str, files: WeightFiles, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Load the tensors under `prefix` into `module` (replacing meta parameters), cast to `dtype` on `device`."""
    wanted = set(module.state_dict().keys())
    tensors = files.load_prefix(prefix)
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ShardError(f"{files.model_dir}: tensors {[prefix + m for m in missing[:5]]} not found")
    state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items() if k in wanted}
    module.load_state_dict(state, strict=True, assign=True)


def release(module: nn.Module) -> None:
    """Free a materialised module's weights by sending its parameters back to the meta device."""
    module.to("meta")
