"""Read and validate a calibration Parquet (`rac.data.segments.CALIB_SCHEMA`) and plan its forward batches.

Packing: sequences are stored in the activation store back to back with no padding, ordered by length
(stable, so equal lengths keep calibration order). A batch is a run of consecutive sequences whose padded
size B x max_len stays within `batch_tokens` (a longer sequence runs alone). In the forward a batch is
right-padded to [B, max_len]: under the causal mask a real token never attends to the pads after it, so its
output equals the unpadded one; pad positions are masked out of the statistics (`batch_mask`) and never
stored. Batch `b` occupies store rows [start, start + n_tokens), sequence-major.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from rac.data.segments import CALIB_META_KEY, SEGMENT_NAMES
from rac.store.artifacts import sha256_file


class CalibrationError(ValueError):
    """The calibration file is unreadable, empty, or holds tokens the model cannot take."""


@dataclass(frozen=True)
class Batch:
    """Sequences `rows` (indices into the calibration order) of `lengths` tokens, stored from row `start`."""

    start: int
    rows: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def seq_len(self) -> int:
        """Padded length of the batch (its longest sequence)."""
        return max(self.lengths)

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return sum(self.lengths)

    def mask(self) -> torch.Tensor:
        """True at real tokens, False at right padding # [B, seq_len] bool."""
        return torch.arange(self.seq_len)[None, :] < torch.tensor(self.lengths)[:, None]


@dataclass(frozen=True)
class Calibration:
    """Validated calibration tokens, their segment labels and the batch plan."""

    path: Path
    sha256: str
    input_ids: list[np.ndarray]  # per sequence, int64 [len]
    segments: list[np.ndarray]  # per sequence, int8 [len]
    batches: tuple[Batch, ...]
    meta: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    def batch_ids(self, batch: Batch) -> torch.Tensor:
        """Token ids of a batch, right-padded with 0 # [B, L] int64."""
        return _pad([self.input_ids[r] for r in batch.rows], batch.seq_len)

    def batch_segments(self, batch: Batch) -> torch.Tensor:
        """Segment labels of a batch, right-padded with 0 # [B, L] int64."""
        return _pad([self.segments[r] for r in batch.rows], batch.seq_len)

    def segment_tokens(self) -> dict[str, int]:
        """Token count per segment name."""
        counts = np.bincount(np.concatenate(self.segments).astype(np.int64), minlength=len(SEGMENT_NAMES))
        return {SEGMENT_NAMES[i]: int(c) for i, c in enumerate(counts)}


def _pad(seqs: list[np.ndarray], width: int) -> torch.Tensor:
    out = np.zeros((len(seqs), width), dtype=np.int64)  # [B, L]
    for i, x in enumerate(seqs):
        out[i, : len(x)] = x
    return torch.from_numpy(out)


def _validate_row(i: int, seq_id: int, ids: np.ndarray, seg: np.ndarray, vocab: int, max_len: int) -> None:
    where = f"calibration row {i} (seq_id {seq_id})"
    if len(ids) == 0:
        raise CalibrationError(f"{where} is empty")
    if len(ids) != len(seg):
        raise CalibrationError(f"{where}: {len(ids)} input_ids but {len(seg)} segment labels")
    if len(ids) > max_len:
        raise CalibrationError(f"{where}: length {len(ids)} exceeds the model's context length {max_len}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        raise CalibrationError(f"{where}: token id {int(ids[bad[0]])} at position {int(bad[0])} "
                               f"is outside the vocabulary [0, {vocab})")
    bad = np.flatnonzero(~np.isin(seg, list(SEGMENT_NAMES)))
    if bad.size:
        raise CalibrationError(f"{where}: segment label {int(seg[bad[0]])} at position {int(bad[0])} "
                               f"is not one of {SEGMENT_NAMES}")


def plan_batches(lengths: list[int], batch_tokens: int) -> tuple[list[int], tuple[Batch, ...]]:
    """Storage order (rows sorted by length, stable) and batches of padded size B x max_len <= batch_tokens."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    batches: list[Batch] = []
    start, i = 0, 0
    while i < len(order):
        j = i + 1  # ascending lengths: the newest member is the longest
        while j < len(order) and (j + 1 - i) * lengths[order[j]] <= batch_tokens:
            j += 1
        rows = tuple(order[i:j])
        batches.append(Batch(start=start, rows=rows, lengths=tuple(lengths[r] for r in rows)))
        start += batches[-1].n_tokens
        i = j
    return order, tuple(batches)


def load_calibration(path: Path, vocab_size: int, max_len: int, batch_tokens: int) -> Calibration:
    """Read `path`, check every token id is in [0, vocab_size) and every length <= max_len, plan batches."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found")
    try:
        table = pq.read_table(str(path))  # a path, never a Python file object (pyarrow exit crash)
    except Exception as exc:
        raise CalibrationError(f"calibration file {path} is not readable Parquet: {exc}") from None
    missing = [c for c in ("seq_id", "input_ids", "segment") if c not in table.column_names]
    if missing:
        raise CalibrationError(f"calibration file {path} lacks column(s) {missing}; has {table.column_names}")
    if table.num_rows == 0:
        raise CalibrationError(f"calibration file {path} has no sequences")
    seq_ids = table.column("seq_id").to_pylist()
    ids_col, seg_col = table.column("input_ids").to_pylist(), table.column("segment").to_pylist()
    input_ids, segments = [], []
    for i, (ids_list, seg_list) in enumerate(zip(ids_col, seg_col, strict=True)):
        ids = np.asarray(ids_list, dtype=np.int64)
        seg = np.asarray(seg_list, dtype=np.int8)
        _validate_row(i, seq_ids[i], ids, seg, vocab_size, max_len)
        input_ids.append(ids)
        segments.append(seg)
    _, batches = plan_batches([len(x) for x in input_ids], batch_tokens)
    raw_meta = (table.schema.metadata or {}).get(CALIB_META_KEY)
    meta = json.loads(raw_meta) if raw_meta else {}
    return Calibration(path, sha256_file(path), input_ids, segments, batches, meta)
