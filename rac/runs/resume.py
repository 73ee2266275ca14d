"""Resume of the two long stages from what the index has verified: CoT shards and pruning steps.

CoTs: every finished shard is hashed and recorded in the index (artifact kind `cots-shard`) from the
generator's `on_shard` callback. Before generation (re)starts, shards are walked in order; at the first
one that is unrecorded or whose sha256 differs, it and every later shard are deleted (never trusted), so
the generator continues from there and writes them again (sampling is deterministic per prompt/sample).

Pruning: every (layer, group) step is recorded (per-linear rows + checkpoint file hashes) from the engine's
`on_step` callback, in one transaction, after the engine has fsynced the files. Before pruning (re)starts
the recorded steps are verified in order; the resume point is the first step that is unrecorded or fails
verification ((n_layers, 0) when all verify: the engine then only assembles the output folder). It needs
the activations entering its layer (recorded with the previous layer's last step); when those do not
verify, the stage starts over (the activations entering layer 0 are recorded with step (0, 0)). Index rows at and after the resume
point are dropped before the engine continues. The checkpoints are deleted once the stage is recorded.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rac.engine.checkpoint import Checkpoints, resume_point
from rac.runs.memo import ProgressFn
from rac.runs.workdir import RunRef, crashpoint
from rac.store.artifacts import ArtifactRef
from rac.store.index import Index, LayerRow

_ACTS_RE = re.compile(r"acts-(\d+)")
_SHARD_RE = re.compile(r"part-(\d+)\.parquet$")


def shard_files(folder: Path) -> list[Path]:
    """The CoT shard files under a stage folder, in shard order."""
    return sorted((p for p in folder.rglob("part-*.parquet") if _SHARD_RE.search(p.name)),
                  key=lambda p: int(_SHARD_RE.search(p.name).group(1)))  # type: ignore[union-attr]


class CotsResume:
    """Verifies recorded CoT shards before generation and records new ones as they land."""

    def __init__(self, index: Index, env: RunRef, key: str, folder: Path, log: Callable[[str], None],
                 point: str = "cots") -> None:
        self.index, self.env, self.key, self.folder, self.log = index, env, key, folder, log
        self.point = point  # the crash point is `<point>.shard:<k>` (a progressive step: its stage name)

    def prepare(self) -> int:
        """Drop every shard from the first unverified one on; returns the number of trusted shards."""
        recorded = {r.uri: r for r in self.index.artifacts(self.key, "cots-shard")}
        shards = shard_files(self.folder)
        trusted = 0
        for path in shards:
            ref = recorded.get(ArtifactRef.of(path).uri)
            if ref is None or ref.check() is not None:
                break
            trusted += 1
        dropped = shards[trusted:]
        for path in dropped:
            self.log(f"[cots] dropping unverified shard {path.name} (regenerated)")
            path.unlink()
        kept = {ArtifactRef.of(p).uri for p in shards[:trusted]}
        self.index.forget_artifacts([u for u in recorded if u not in kept])
        return trusted

    def on_shard(self, progress: ProgressFn, total: int) -> Callable[[int, Path], None]:
        """The generator's callback `(k, path)` after shard k is renamed into place: hash it, record it."""

        def callback(k: int, path: Path) -> None:
            ref = ArtifactRef.of(path, "cots-shard")
            crashpoint(f"{self.point}.shard:{k}")
            self.index.record_artifacts([ref], self.key)
            progress(k + 1, max(total, k + 1), f"shard {k}")

        return callback

    def final_ref(self) -> ArtifactRef:
        """The finished CoT folder (all shards); every shard must be recorded and verified."""
        recorded = {r.uri: r for r in self.index.artifacts(self.key, "cots-shard")}
        missing = [p for p in shard_files(self.folder) if ArtifactRef.of(p).uri not in recorded]
        if missing:
            self.index.record_artifacts([ArtifactRef.of(p, "cots-shard") for p in missing], self.key)
        return ArtifactRef.of(self.folder, "cots", patterns=("*part-*.parquet",))


class PruneResume:
    """Plans the engine's `start_at` from verified index steps and records new steps as they land."""

    def __init__(self, index: Index, env: RunRef, key: str, folder: Path, log: Callable[[str], None],
                 n_layers: int, n_groups: int) -> None:
        self.index, self.env, self.key, self.folder, self.log = index, env, key, folder, log
        self.n_layers, self.n_groups = n_layers, n_groups
        self.out_dir = folder / "model"
        self.work_dir = folder / "work"

    def plan(self) -> tuple[int, int] | None:
        """The first (layer, group) to compute, or None to start over; drops index rows from there on.

        A step counts as done when the index recorded it and its checkpoint files still verify
        (`rac.engine.checkpoint.resume_point` walks the steps; the activations entering the resume layer,
        recorded with the step before it, must verify too)."""
        steps = {(layer, group): refs for layer, group, refs in self.index.steps(self.key)}

        def done(layer: int, group: int) -> bool:
            weights = [r for r in steps.get((layer, group), []) if not _ACTS_RE.search(r.path.name)]
            bad = [p for p in (r.check() for r in weights) if p is not None]
            if (layer, group) in steps and (bad or not weights):
                self.log(f"[prune] step ({layer}, {group}) not trusted: {bad or 'no checkpoint files'}")
            return bool(weights) and not bad

        def has_acts(layer: int) -> bool:
            acts = [r for refs in steps.values() for r in refs
                    if (m := _ACTS_RE.search(r.path.name)) and int(m.group(1)) == layer]
            ok = bool(acts) and all(r.check() is None for r in acts)
            if not ok:
                self.log(f"[prune] no verified activations entering layer {layer}: starting over")
            return ok

        start = resume_point(done, has_acts, self.n_layers, self.n_groups)
        if start is None:
            self.index.forget_steps(self.key)
            shutil.rmtree(self.work_dir, ignore_errors=True)
        else:
            self.index.forget_steps(self.key, start)
            self.log(f"[prune] resuming at layer {start[0]}, group {start[1]} of {self.n_layers} layers")
        shutil.rmtree(self.out_dir, ignore_errors=True)  # an unrecorded output is never trusted
        return start

    def on_step(self, progress: ProgressFn) -> Callable[[Any], None]:
        """The engine's callback: hash the step's checkpoint files, then write its index rows (one transaction)."""

        def callback(rec: Any) -> None:
            files = [Path(f.path) for f in rec.files]
            if (rec.layer, rec.group) == (0, 0):  # the embedding outputs entering layer 0, written before it
                acts0 = Checkpoints(self.work_dir).acts_path(0)
                files += [p for p in (acts0, acts0.with_name(acts0.name + ".json")) if p.is_file()]
            refs = [ArtifactRef.of(p, "ckpt-acts" if _ACTS_RE.search(p.name) else "ckpt-weights") for p in files]
            rows = [LayerRow(rec.layer, rec.group, lin.name, lin.sparsity, lin.rel_error, lin.loss, lin.damp,
                             lin.retries, lin.seconds) for lin in rec.linears]
            experts = [(x.expert, seg, n) for x in rec.experts for seg, n in x.segment_tokens.items()]  # MoE
            crashpoint(f"prune.step:{rec.layer}:{rec.group}")
            self.index.record_step(self.env.run_id, self.key, rec.layer, rec.group, rows, refs, experts)
            crashpoint(f"prune.row:{rec.layer}:{rec.group}")
            done = rec.layer * self.n_groups + rec.group + 1
            progress(done, self.n_layers * self.n_groups, f"layer {rec.layer} group {rec.group}")

        return callback

    def cleanup(self) -> None:
        """Drop the engine's checkpoints and their index rows (call once the stage is recorded as done)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.index.forget_checkpoints(self.key)
