"""Token segment labels and the calibration Parquet schema shared by the data and engine stages.

A calibration set is a Parquet file with one row per sequence:
  seq_id   int64          stable id of the sequence inside the set
  source   string         where it came from (e.g. "gsm8k-symbolic", "generic", "cot:<prompt_id>/<sample>")
  input_ids list<int32>   the exact token ids (for RAC: prompt ids + the sampled CoT ids, never re-tokenised)
  segment  list<int8>     one label per token: SEGMENT_IDS below
The file's schema metadata carries b"rac.calibration" = JSON {kind, tokenizer, n_tokens, decode_share, ...}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pyarrow as pa

SEGMENT_IDS: dict[str, int] = {"prompt": 0, "decode": 1, "other": 2}
SEGMENT_NAMES: dict[int, str] = {v: k for k, v in SEGMENT_IDS.items()}
DEFAULT_SEGMENT_WEIGHTS: dict[str, float] = {"prompt": 1.0, "decode": 1.0, "other": 1.0}


def check_segment_weights(v: Mapping[str, float]) -> dict[str, float]:
    """Segment weights w_s of H = sum_s w_s H_s: known segments, finite, >= 0, not all 0 (a segment left out
    weighs 0). The one check of `compress.segment_weights` and of a prune entry's override."""
    unknown = sorted(set(v) - set(SEGMENT_IDS))
    if unknown:
        raise ValueError(f"unknown segment(s) {unknown} in segment_weights; known: {sorted(SEGMENT_IDS)}")
    bad = {k: w for k, w in v.items() if not (math.isfinite(w) and w >= 0)}
    if bad or not any(w > 0 for w in v.values()):
        raise ValueError(f"segment_weights must be finite, >= 0 and not all 0, got {dict(v)}")
    return dict(v)


def weights_tag(weights: Mapping[str, float]) -> str:
    """The weighting in labels and setting columns: the first letter of each given segment and its weight, in
    SEGMENT_IDS order, e.g. {prompt: 1, decode: 3} -> "p1d3", {prompt: 0.5, decode: 1, other: 1} -> "p0.5d1o1"."""
    return "".join(f"{name[0]}{float(weights[name]):g}" for name in SEGMENT_IDS if name in weights)

CALIB_SCHEMA = pa.schema(
    [
        pa.field("seq_id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("segment", pa.list_(pa.int8()), nullable=False),
    ]
)
CALIB_META_KEY = b"rac.calibration"
