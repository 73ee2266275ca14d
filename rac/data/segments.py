"""Token segment labels and the calibration Parquet schema shared by the data and engine stages.

A calibration set is a Parquet file with one row per sequence:
  seq_id   int64          stable id of the sequence inside the set
  source   string         where it came from (e.g. "gsm8k-symbolic", "generic", "cot:<prompt_id>/<sample>")
  input_ids list<int32>   the exact token ids (for RAC: prompt ids + the sampled CoT ids, never re-tokenised)
  segment  list<int8>     one label per token: SEGMENT_IDS below
The file's schema metadata carries b"rac.calibration" = JSON {kind, tokenizer, n_tokens, decode_share, ...}.
"""

from __future__ import annotations

import pyarrow as pa

SEGMENT_IDS: dict[str, int] = {"prompt": 0, "decode": 1, "other": 2}
SEGMENT_NAMES: dict[int, str] = {v: k for k, v in SEGMENT_IDS.items()}

CALIB_SCHEMA = pa.schema(
    [
        pa.field("seq_id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("segment", pa.list_(pa.int8()), nullable=False),
    ]
)
CALIB_META_KEY = b"rac.calibration"
