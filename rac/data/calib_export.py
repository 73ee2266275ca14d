"""Export a calibration set (`rac.data.segments.CALIB_SCHEMA` Parquet) as a Hugging Face `datasets` dataset.

`export_calibration(calib_path, dest)` writes `dest` with `Dataset.save_to_disk`, one row per calibration
sequence in the Parquet's order (seq_id 0, 1, ...), already tokenized, for tools that take a tokenized
`datasets.Dataset` (llm-compressor's `oneshot(dataset=...)`, GPTQModel, AutoRound):
  input_ids       list<int32>  the exact token ids of the calibration set (never re-tokenised)
  attention_mask  list<int8>   all ones, the same length as input_ids (the sequences are not padded)
  segment         list<int8>   one label per token, `SEGMENT_IDS` (0 prompt, 1 decode, 2 other)
  source          string       where the sequence came from (e.g. "cot:<prompt_id>/<sample>")
The calibration's metadata (kind, tokenizer, token counts, segment shares, the Parquet's sha256) and
`segment_names` are in `dataset.info.description` (a JSON document) and in `rac_calibration.json` beside the
dataset files. The folder is built in a `.tmp-` sibling and renamed into place; an existing non-empty
`dest` is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from rac.data.segments import CALIB_META_KEY, CALIB_SCHEMA, SEGMENT_IDS, SEGMENT_NAMES
from rac.store.artifacts import atomic_dir, sha256_file

SIDECAR = "rac_calibration.json"
FORMAT = "rac.calibration-export/1"
FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "attention_mask": datasets.Sequence(datasets.Value("int8")),
    "segment": datasets.Sequence(datasets.Value("int8")),
    "source": datasets.Value("string"),
})


class ExportError(ValueError):
    """The calibration set cannot be exported (not a calibration Parquet, or the destination is taken)."""


@dataclass(frozen=True)
class ExportedCalibration:
    """What export_calibration wrote."""

    path: Path
    source: Path  # the calibration Parquet
    source_sha256: str
    kind: str
    n_seqs: int
    n_tokens: int
    decode_share: float
    prompt_share: float
    other_share: float
    max_seq_len: int  # the longest exported sequence (what `max_seq_length` must be at least)


def _check_dest(dest: Path) -> None:
    if dest.is_dir() and not any(dest.iterdir()):
        return  # an empty folder is replaced
    if dest.exists() or dest.is_symlink():
        raise ExportError(f"export destination {str(dest)!r} already exists and is not empty: "
                          f"choose a new path or remove it")


def _read(calib_path: Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """(columns, metadata JSON) of a calibration Parquet, checked against CALIB_SCHEMA."""
    if not calib_path.is_file():
        raise ExportError(f"calibration file {str(calib_path)!r} does not exist")
    table = pq.read_table(calib_path)
    missing = [f.name for f in CALIB_SCHEMA if f.name not in table.column_names]
    raw = (table.schema.metadata or {}).get(CALIB_META_KEY)
    if missing or raw is None:
        what = f"missing columns {missing}" if missing else f"no {CALIB_META_KEY.decode()!r} schema metadata"
        raise ExportError(f"{calib_path} is not a rac calibration set ({what})")
    cols = {name: table.column(name).to_pylist() for name in ("seq_id", "source", "input_ids", "segment")}
    for i, (ids, seg) in enumerate(zip(cols["input_ids"], cols["segment"], strict=True)):
        if len(ids) != len(seg):
            raise ExportError(f"{calib_path} row {i}: {len(ids)} input_ids but {len(seg)} segment labels")
    return cols, dict(json.loads(raw))


def export_calibration(calib_path: Path, dest: Path) -> ExportedCalibration:
    """Write the calibration set at `calib_path` as a `datasets` dataset folder `dest` (module docstring)."""
    calib_path, dest = Path(calib_path), Path(dest)
    _check_dest(dest)
    cols, meta = _read(calib_path)
    order = sorted(range(len(cols["seq_id"])), key=lambda i: cols["seq_id"][i])
    ids = [cols["input_ids"][i] for i in order]
    seg = [cols["segment"][i] for i in order]
    n_tokens = sum(len(x) for x in ids)
    shares = {f"{name}_share": (sum(s.count(v) for s in seg) / n_tokens if n_tokens else 0.0)
              for name, v in SEGMENT_IDS.items()}
    summary = ExportedCalibration(
        path=dest, source=calib_path, source_sha256=sha256_file(calib_path), kind=str(meta.get("kind", "")),
        n_seqs=len(ids), n_tokens=n_tokens, max_seq_len=max((len(x) for x in ids), default=0), **shares)
    doc = {
        "format": FORMAT,
        "columns": {"input_ids": "token ids", "attention_mask": "all ones (no padding)",
                    "segment": "per-token label, see segment_names", "source": "origin of the sequence"},
        "segment_names": {str(k): v for k, v in sorted(SEGMENT_NAMES.items())},
        "source": {"path": str(calib_path.resolve()), "sha256": summary.source_sha256},
        "kind": summary.kind, "n_seqs": summary.n_seqs, "n_tokens": n_tokens, "max_seq_len": summary.max_seq_len,
        **shares,
        "calibration": meta,  # the Parquet's own metadata (tokenizer, config, template, sources, ...)
    }
    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    ds = datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "segment": seg,
         "source": [cols["source"][i] for i in order]},
        features=FEATURES, info=datasets.DatasetInfo(description=text, features=FEATURES),
    )
    with atomic_dir(dest) as tmp:
        ds.save_to_disk(str(tmp))
        (tmp / SIDECAR).write_text(text + "\n")
    return summary


def exported_metadata(dest: Path) -> dict[str, Any]:
    """The metadata document of an exported calibration folder (`rac_calibration.json`)."""
    return dict(json.loads((Path(dest) / SIDECAR).read_text()))


def summary_json(summary: ExportedCalibration) -> dict[str, Any]:
    """ExportedCalibration as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(summary).items()}
