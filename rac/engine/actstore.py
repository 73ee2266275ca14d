"""Disk-backed activation store: the hidden states of every calibration token at one layer boundary.

Layout: one raw file of shape [n_tokens, hidden] (row-major, no padding, sequences packed back to back in
calibration order; bfloat16 stored as its 16-bit pattern) plus a JSON sidecar with shape and dtype. Reads and
writes go through a memory map of just the requested row range (a fresh `numpy.memmap` window per call,
closed right after), so the process never keeps the whole store mapped or resident.

Size on disk is n_tokens x hidden x bytes(dtype): e.g. 1M calibration tokens of a 70B model
(hidden 8192) in bfloat16 take 1e6 x 8192 x 2 B = 16 GiB per store, and the engine keeps two (layer input
and layer output), i.e. 32 GiB of disk - never RAM.

A store is first written to a temp sibling (the `.tmp-` marker of `rac.store.artifacts`, so a killed
writer's leftovers are swept) and only `commit()` fsyncs it and renames it into place, so a committed store
is always complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rac.dtypes import torch_dtype
from rac.store.artifacts import atomic_write_json, fsync_dir, fsync_file, temp_sibling

ACT_DTYPES = ("bfloat16", "float32")
_NP_STORAGE: dict[str, type[np.generic]] = {"bfloat16": np.uint16, "float32": np.float32}


@dataclass(frozen=True)
class StoreSpec:
    """Shape and dtype of a store."""

    n_tokens: int
    hidden: int
    dtype: str

    def nbytes(self) -> int:
        """Size of the data file in bytes: n_tokens x hidden x bytes(dtype)."""
        return self.n_tokens * self.hidden * np.dtype(_NP_STORAGE[self.dtype]).itemsize


class ActStore:
    """[n_tokens, hidden] hidden states on disk; `read`/`write` move row ranges as torch tensors."""

    def __init__(self, path: Path, spec: StoreSpec, writable: bool) -> None:
        self.path = Path(path)
        self.spec = spec
        self.writable = writable
        self._np_dtype = np.dtype(_NP_STORAGE[spec.dtype])
        self._torch_dtype = torch_dtype(spec.dtype, ACT_DTYPES)
        self._tmp = temp_sibling(self.path)  # where a writable store's data lives until `commit`
        self._row_bytes = spec.hidden * self._np_dtype.itemsize

    @staticmethod
    def sidecar(path: Path) -> Path:
        """The JSON sidecar of a store data file."""
        return Path(str(path) + ".json")

    @classmethod
    def create(cls, path: Path, n_tokens: int, hidden: int, dtype: str) -> ActStore:
        """A new zero-filled store written at a temp sibling (sparse file); `commit()` publishes it at `path`."""
        if dtype not in ACT_DTYPES:
            raise ValueError(f"act dtype {dtype!r} not supported; known: {sorted(ACT_DTYPES)}")
        if n_tokens < 1 or hidden < 1:
            raise ValueError(f"store shape must be positive, got n_tokens={n_tokens}, hidden={hidden}")
        spec = StoreSpec(n_tokens, hidden, dtype)
        store = cls(path, spec, writable=True)
        with open(store._tmp, "wb") as f:
            f.truncate(spec.nbytes())
        return store

    @classmethod
    def open(cls, path: Path) -> ActStore:
        """A committed store, read-only; ValueError if it is missing or its size disagrees with its sidecar."""
        path = Path(path)
        side = cls.sidecar(path)
        if not path.is_file() or not side.is_file():
            raise ValueError(f"activation store {path} (or its sidecar) not found")
        meta = json.loads(side.read_text())
        spec = StoreSpec(int(meta["n_tokens"]), int(meta["hidden"]), str(meta["dtype"]))
        if path.stat().st_size != spec.nbytes():
            raise ValueError(f"activation store {path} has {path.stat().st_size} bytes, expected {spec.nbytes()}")
        return cls(path, spec, writable=False)

    def _window(self, start: int, rows: int, mode: Literal["r", "r+"]) -> np.memmap:
        if start < 0 or rows < 1 or start + rows > self.spec.n_tokens:
            raise ValueError(f"rows [{start}, {start + rows}) outside store of {self.spec.n_tokens} tokens")
        path = self._tmp if self.writable else self.path
        return np.memmap(
            path, dtype=self._np_dtype, mode=mode, offset=start * self._row_bytes, shape=(rows, self.spec.hidden)
        )

    def read(self, start: int, rows: int) -> torch.Tensor:
        """Rows [start, start+rows) as a new tensor # [rows, hidden] in the store dtype."""
        window = self._window(start, rows, "r")
        data = torch.from_numpy(np.array(window))  # copy, then the mapping is dropped
        del window
        return data.view(self._torch_dtype) if self.spec.dtype == "bfloat16" else data

    def write(self, start: int, x: torch.Tensor) -> None:
        """Store `x` # [rows, hidden] at rows [start, start+rows), cast to the store dtype."""
        if not self.writable:
            raise ValueError(f"activation store {self.path} is read-only")
        if x.dim() != 2 or x.shape[1] != self.spec.hidden:
            raise ValueError(f"expected [rows, {self.spec.hidden}] activations, got {list(x.shape)}")
        data = x.detach().to(device="cpu", dtype=self._torch_dtype).contiguous()
        if self.spec.dtype == "bfloat16":
            data = data.view(torch.int16)
        window = self._window(start, x.shape[0], "r+")
        window[:] = data.numpy().view(self._np_dtype)
        window.flush()
        del window

    def commit(self) -> None:
        """fsync the data, write the sidecar atomically, and rename the data file into place."""
        if not self.writable:
            raise ValueError(f"activation store {self.path} is already committed")
        fsync_file(self._tmp)
        meta = {"n_tokens": self.spec.n_tokens, "hidden": self.spec.hidden, "dtype": self.spec.dtype}
        atomic_write_json(self.sidecar(self.path), meta)
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        self.writable = False

    def delete(self) -> None:
        """Remove the data file, its sidecar and any temp file."""
        for p in (self.path, self.sidecar(self.path), self._tmp):
            p.unlink(missing_ok=True)
