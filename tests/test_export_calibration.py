"""`export_calibration` / `calibration_of_run`: a run's calibration set as a `datasets` dataset (issue 13).

What llm-compressor needs (checked in vllm-project/llm-compressor, stored main-branch snapshot of the 0.14
line; llm-compressor itself is not installed here and must not be):
  - src/llmcompressor/entrypoints/oneshot.py: `oneshot(model, ..., recipe=..., dataset: str | Dataset |
    DatasetDict | DataLoader | None, ..., num_calibration_samples: int = 512, shuffle_calibration_samples,
    max_seq_length: int | None = None, data_collator="truncation", batch_size=1, ...)`;
  - src/llmcompressor/datasets/utils.py `get_processed_dataset`: `if hasattr(dataset, "column_names") and
    "input_ids" in dataset.column_names: return dataset  # dataset is already tokenized` (no tokenizer pass);
    `format_calibration_data` wraps it in a DataLoader whose `DataCollatorWithTruncation` cuts `input_ids`,
    `labels`, `attention_mask`, `loss_mask` to the shortest in the batch (and `max_seq_length`), then calls
    transformers' `default_data_collator`, which turns every non-string column into a tensor of the batch;
    `LengthAwareSampler` reads the lengths from `input_ids`.
So a `datasets.Dataset` with `input_ids` and `attention_mask` (lists of ints of equal length) is what it
takes; the `segment` column would reach the model as a tensor too, so users select the two columns
(docs/export.md), and the test feeds such a batch, collated by `default_data_collator`, to the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import pytest
import torch
from transformers import default_data_collator
from workdirs import calibration_stages

from rac.data.calib_export import SIDECAR, ExportError, export_calibration, exported_metadata
from rac.data.segments import CALIB_META_KEY, SEGMENT_IDS
from rac.models.loading import load_causal_lm
from rac.runs.calibration_export import CalibrationNotFoundError, calibration_of_run, export_run_calibration
from rac.store.artifacts import TEMP_MARK, ArtifactError

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """prompts -> CoTs -> `prompt` and `rac` calibrations through the stage steps (no Prefect, no pruning)."""
    tmp = tmp_path_factory.mktemp("export")
    built = calibration_stages(tmp, "v", ("prompt", "rac"))
    return {"dir": tmp, "model": built["model"],
            "calib": {n: c.output("calibration").path for n, c in built["calib"].items()}}


def _parquet(path: Path) -> dict[str, list[Any]]:
    return pq.read_table(path).to_pydict()


@pytest.mark.parametrize("name", ["prompt", "rac"])
def test_export_gives_exactly_the_calibration_sequences(work: dict[str, Any], tmp_path: Path, name: str) -> None:
    path = calibration_of_run(work["dir"], "v", name)
    assert path == work["calib"][name]
    dest = tmp_path / "out" / name
    summary = export_calibration(path, dest)
    ds = datasets.load_from_disk(str(dest))
    assert isinstance(ds, datasets.Dataset)
    pq_rows = _parquet(path)
    assert pq_rows["seq_id"] == list(range(len(ds)))  # rows keep the Parquet's order
    assert ds.column_names == ["input_ids", "attention_mask", "segment", "source"]
    assert ds["input_ids"] == pq_rows["input_ids"]
    assert ds["segment"] == pq_rows["segment"]
    assert ds["source"] == pq_rows["source"]
    assert all(m == [1] * len(ids) for m, ids in zip(ds["attention_mask"], ds["input_ids"], strict=True))
    # the metadata: in the dataset info and beside it, equal to the Parquet's own
    parquet_meta = json.loads(pq.read_schema(path).metadata[CALIB_META_KEY])
    info = json.loads(ds.info.description)
    assert info == exported_metadata(dest)
    assert info["calibration"] == parquet_meta and info["kind"] == name == summary.kind
    assert info["n_tokens"] == parquet_meta["n_tokens"] == summary.n_tokens == sum(len(x) for x in ds["input_ids"])
    assert info["n_seqs"] == len(ds) == summary.n_seqs
    assert info["decode_share"] == pytest.approx(parquet_meta["decode_share"])
    assert (info["decode_share"] > 0) == (name == "rac")
    assert {int(k): v for k, v in info["segment_names"].items()} == {v: k for k, v in SEGMENT_IDS.items()}
    assert info["max_seq_len"] == max(len(x) for x in ds["input_ids"])
    assert not [p for p in dest.parent.iterdir() if TEMP_MARK in p.name]  # built aside, renamed into place
    assert (dest / SIDECAR).is_file()


def test_what_llmcompressor_oneshot_needs_is_there(work: dict[str, Any], tmp_path: Path) -> None:
    dest = tmp_path / "ds"
    export_run_calibration(work["dir"], "v", "rac", dest)
    ds = datasets.load_from_disk(str(dest))
    # get_processed_dataset: a Dataset with an `input_ids` column is taken as already tokenized
    assert isinstance(ds, datasets.Dataset) and "input_ids" in ds.column_names
    for col in ("input_ids", "attention_mask"):
        feature = ds.features[col]
        assert isinstance(feature, datasets.Sequence) and feature.feature.dtype in ("int32", "int8", "int64")
    row = ds[0]
    assert all(isinstance(t, int) for t in row["input_ids"] + row["attention_mask"])
    assert len(row["input_ids"]) == len(row["attention_mask"])
    # what the docs tell users to pass: the two model inputs; collated the way oneshot's truncation collator
    # ends (transformers' default_data_collator), the batch runs the model
    model_ds = ds.select_columns(["input_ids", "attention_mask"])
    batch = default_data_collator([model_ds[0]])
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].dtype == torch.int64
    model = load_causal_lm(work["model"], torch.float32)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    # left unselected, `segment` would reach the model as one more tensor: why the docs select the columns
    assert "segment" in default_data_collator([ds[0]])


def test_refuses_an_existing_non_empty_destination(work: dict[str, Any], tmp_path: Path) -> None:
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="taken.*already exists and is not empty") as err:
        export_calibration(work["calib"]["rac"], dest)
    assert "\n" not in str(err.value)
    assert (dest / "keep.txt").read_text() == "mine" and len(list(dest.iterdir())) == 1
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_calibration(work["calib"]["rac"], a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_calibration(work["calib"]["rac"], empty)  # an empty folder is fine
    assert len(datasets.load_from_disk(str(empty))) > 0


def test_unknown_run_or_name_lists_the_known_ones(work: dict[str, Any]) -> None:
    with pytest.raises(CalibrationNotFoundError, match=r"no run 'nope'.*known runs: \['v'\]") as err:
        calibration_of_run(work["dir"], "nope", "rac")
    assert "\n" not in str(err.value)
    with pytest.raises(CalibrationNotFoundError, match=r"no completed calibration set 'c4'.*\['prompt', 'rac'\]"):
        calibration_of_run(work["dir"], "v", "c4")
    with pytest.raises(FileNotFoundError, match="no index"):
        calibration_of_run(work["dir"] / "empty", "v", "rac")


def test_a_not_a_calibration_file_is_refused(tmp_path: Path, work: dict[str, Any]) -> None:
    other = tmp_path / "x.parquet"
    table = pq.read_table(work["calib"]["rac"]).drop_columns(["segment"])
    pq.write_table(table, other)
    with pytest.raises(ExportError, match=r"not a rac calibration set \(missing columns \['segment'\]\)"):
        export_calibration(other, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_flipped_byte_in_the_parquet_is_refused(work: dict[str, Any], tmp_path: Path) -> None:
    path = work["calib"]["prompt"]
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    try:
        path.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match=r"calibration 'prompt' of run 'v'.*changed.*rac verify v") as err:
            export_run_calibration(work["dir"], "v", "prompt", tmp_path / "d")
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "d").exists()
    finally:
        path.write_bytes(original)  # the module's work dir serves the other tests
    assert calibration_of_run(work["dir"], "v", "prompt") == path
