"""The typed, frozen results of `rac.api`: a calibration set, a pruned model, an evaluation, benchmark numbers.

Each one says where it lives (run id, stage key, files in the work dir) and carries the numbers a notebook
wants without another query; the index (`rac sql`) holds the same numbers under the same run and stage key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rac.data.calib_export import ExportedCalibration, export_calibration
from rac.data.segments import SEGMENT_NAMES
from rac.data.templates import TemplateConfig
from rac.eval.harness import HarnessMetric
from rac.store.artifacts import ArtifactRef
from rac.store.index import LayerRow


@dataclass(frozen=True)
class CalibSequence:
    """One calibration sequence: its token ids and one segment label per token (0 prompt, 1 decode, 2 other)."""

    seq_id: int
    source: str  # e.g. "prompt:<prompt_id>", "cot:<prompt_id>/<sample>", "generic:lee/<window>"
    input_ids: tuple[int, ...]
    segment: tuple[int, ...]

    def segment_names(self) -> tuple[str, ...]:
        """The segment label of every token by name ("prompt", "decode", "other")."""
        return tuple(SEGMENT_NAMES[s] for s in self.segment)


@dataclass(frozen=True)
class Calibration:
    """A calibration set built by `rac.api.calibrate` (the `calib/<name>` stage of run `run_id`).

        cal = rac.api.calibrate("tiny-llama", ["What is 2 + 3?"], kind="prompt", token_budget=64)
        cal.n_tokens, cal.decode_share, cal.path       # numbers and the Parquet file
        cal.sequences()[0].input_ids                   # the exact token ids the pruner sees
    """

    name: str
    kind: str  # generic | prompt | rac | self
    run_id: str
    work_dir: Path
    stage_key: str
    path: Path  # stages/calib/<stage_key>/calib.parquet
    artifact: ArtifactRef  # path + sha256 as the index recorded it
    model: Path  # the dense model folder whose tokenizer (and CoTs) built it
    model_revision: str
    n_seqs: int
    n_tokens: int
    decode_share: float
    prompt_share: float
    other_share: float
    exhausted: bool  # the source ran out before the token budget
    template: TemplateConfig | None  # the prompts' chat template (None: a set without prompts)
    template_hash: str | None
    reused: bool  # found in the index, nothing computed

    def sequences(self) -> tuple[CalibSequence, ...]:
        """Every sequence of the set, in order, read from its Parquet file."""
        table = pq.read_table(self.path, columns=["seq_id", "source", "input_ids", "segment"])
        cols = [table.column(c).to_pylist() for c in ("seq_id", "source", "input_ids", "segment")]
        return tuple(CalibSequence(int(i), str(s), tuple(ids), tuple(seg)) for i, s, ids, seg in zip(*cols, strict=True))

    def export(self, dest: Path | str) -> ExportedCalibration:
        """The set as a `datasets` dataset folder (input_ids, attention_mask, segment, source) at `dest`, the
        form llm-compressor's `oneshot(dataset=...)` takes (docs/export.md)."""
        return export_calibration(self.path, Path(dest))


@dataclass(frozen=True)
class PrunedModel:
    """A model pruned by `rac.api.prune` (the `prune/<label>` stage): a Hugging Face folder and its records.

        pruned = rac.api.prune("tiny-llama", cal, method="sparsegpt", sparsity=0.5)
        pruned.folder              # loads with transformers / vLLM
        pruned.achieved_sparsity   # zeros / weights over the pruned linears
        pruned.records[0]          # LayerRow(layer, group, linear, sparsity, rel_error, loss, damp, ...)
    """

    label: str  # <calibration>-<method>-<setting>, as `rac run` names it
    run_id: str
    work_dir: Path
    stage_key: str
    folder: Path  # stages/prune/<stage_key>/model
    artifact: ArtifactRef
    base_model: Path  # the dense model folder
    base_revision: str
    calibration: Calibration
    method: str
    sparsity: float  # the target share of zeros per row (N:M: 1 - N/M)
    nm: tuple[int, int] | None
    achieved_sparsity: float  # sum(zeros) / sum(weights) over the linears in `records`
    records: tuple[LayerRow, ...]  # one per pruned linear, in (layer, group, linear) order
    n_tokens: int  # calibration tokens the statistics saw
    reused: bool


@dataclass(frozen=True)
class EvalResult:
    """An evaluation by `rac.api.evaluate` (the `eval/<label>` stage and its `evals` row).

        ev = rac.api.evaluate(pruned, [{"prompt": "What is 2 + 3?", "answer": "5"}])
        ev.accuracy, (ev.ci_low, ev.ci_high), ev.mean_tokens, ev.runaway_share
    """

    label: str  # dense, or the pruned model's label
    run_id: str
    work_dir: Path
    stage_key: str
    model: Path  # the evaluated folder
    n_problems: int
    n_samples: int
    accuracy: float  # pass@1, mean over samples then problems
    ci_low: float  # 95% bootstrap interval over problems
    ci_high: float
    mean_tokens: float  # completion (CoT) length in tokens
    median_tokens: float
    p90_tokens: float
    runaway_share: float  # share of samples that hit the token cap
    wall_s: float
    tokens_per_s: float
    rows_path: Path  # per-sample rows (prompt_id, gold, pred, correct, completion_len, finish_reason, text)
    reused: bool

    def rows(self) -> pa.Table:
        """The graded per-sample rows (`rac.eval.evaluate.ROWS_SCHEMA`)."""
        return pq.read_table(self.rows_path)


@dataclass(frozen=True)
class HarnessResult:
    """lm-eval numbers of one model of a run (`rac.api.harness`; rows of the `harness_results` table).

        res = rac.api.harness(run_id, ["arc_easy"], limit=100)
        res[0].value("arc_easy", "acc")
    """

    label: str  # dense, or a pruned model's label
    run_id: str
    stage_key: str
    model: Path
    harness: str  # "lm-eval"
    harness_version: str
    backend: str
    metrics: tuple[HarnessMetric, ...]
    reused: bool

    def value(self, task: str, metric: str, filter: str = "none") -> float | None:
        """The number of (task, metric, filter); KeyError naming what exists when there is none."""
        for m in self.metrics:
            if (m.task, m.metric, m.filter) == (task, metric, filter):
                return m.value
        have = sorted({(m.task, m.metric, m.filter) for m in self.metrics})
        raise KeyError(f"no {(task, metric, filter)} in the results of {self.label!r}; have {have}")
