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
from transformers import PretrainedConfig, PreTrainedModel

from rac.models.adapters import Adapter, get_adapter
from rac.models.loading import BUILD_LOCK, causal_lm_from_config, load_hf_config

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
    """The model fingerprint: sha256 over the name and content sha256 of every file that changes what the
    model computes or how prompts are rendered and tokenized.

    Counted, where present: ``config.json`` (required), ``generation_config.json``,
    ``model.safetensors.index.json``, every ``*.safetensors`` shard (at least one required; each header is
    also checked, so a truncated shard raises `ShardError`), ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``added_tokens.json``, ``chat_template.jinja``, ``chat_template.json``,
    ``additional_chat_templates/*.jinja``, ``vocab.json``, ``vocab.txt``, ``merges.txt``,
    ``tokenizer.model``, and top-level ``*.py`` (remote code under ``trust_remote_code``). Not counted:
    anything else (README.md, rac_provenance.json, rac_asset.json, ...).

    File hashes come from `rac.models.file_hashes` (cached by path, size, mtime, ctime, inode and
    device), so a folder is read in full once until one of its files changes. Measured on a 2-core AMD
    EPYC VM for Qwen2.5-Coder-0.5B (1.27 GB; docs/pipeline.md has the command): first call 1.6-2.3 s with
    the files in the page cache (4.0 s when not), cached call 1-2 ms. Uncached hashing runs at 0.55-0.8
    GB/s (sha256 on one core), so a 70B bf16 folder (~140 GB) takes 3-4 minutes (or the disk's read time),
    once.
    """
    from rac.models.file_hashes import sha256_files

    names = ("config.json", "generation_config.json", INDEX_NAME, "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
             "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model")
    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(root)!r} has no config.json")
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"model folder {str(root)!r} has no *.safetensors weights")
    for shard in shards:
        safetensors_header(shard)
    files = [*(root / n for n in names if (root / n).is_file()), *shards,
             *sorted(root.glob("additional_chat_templates/*.jinja")), *sorted(root.glob("*.py"))]
    rels = [f.relative_to(root).as_posix() for f in files]
    digest = hashlib.sha256(b"rac model revision v2\n")
    for rel, sha in sorted(zip(rels, sha256_files(files), strict=True)):
        digest.update(f"{rel}\0{sha}\n".encode())
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
    config = load_hf_config(model_dir, trust_remote_code)
    return config, get_adapter(config.model_type)


def build_skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM with every parameter on the meta device (non-persistent buffers stay real)."""
    with BUILD_LOCK, init_empty_weights(include_buffers=False):  # its patch is process-wide (rac.models.loading)
        model = causal_lm_from_config(config, trust_remote_code=trust_remote_code)
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
