"""Replay of a layer's finished sub-blocks in group-sequential order, instead of recomputing them.

In group order a decoder layer is forwarded once per group's statistics pass (from the layer input up to that
group's linears) and once more to write its outputs. Once every pruned linear inside a sub-block (an adapter
`Block`, e.g. `self_attn`) is final, the block's output for each batch no longer changes: the first statistics
pass that runs it with final weights records it, and every later pass of the layer returns the recorded
tensor instead of running the block. A block with a `tail` linear (Llama's MLP returns `down_proj(x)`) is
recorded as the tail's input once its other linears are final, and replayed as `tail(x)`: the tail may be
pruned in between (the MLP's gate/up run once more, in the down_proj pass, instead of three times).

For Llama-style layers the statistics passes then cost q/k/v + attention (group o), the MLP's gate/up
(group down) and nothing for group gate/up, and the propagation pass costs down_proj only, instead of about
two full forwards per layer. The recorded tensors are the very values recomputation would give (same inputs,
same weights, same shapes, read back into fresh tensors), so the pruned weights are bitwise those of the
recomputing path (tests/test_replay.py). Layer-sequential order prunes everything after one dense pass, so
nothing is final before the propagation pass and there is nothing to replay.

Recordings are whole padded batches in the layer's dtype, in an unnamed temp file per block next to the
activation stores (disk, never RAM: one layer's block outputs, e.g. padded tokens x (hidden + intermediate)
x 4 B in float32); the file disappears when the layer is done or the process ends. A block whose output is
not a tensor (or a tuple of one tensor and Nones) is simply not recorded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rac.models.adapters import Adapter, Block, get_submodule


class _Scratch:
    """One tensor per batch index in an unnamed temp file (removed on close, or when the process ends)."""

    def __init__(self, folder: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".replay-")
        self._entries: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._end = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, index: int, x: torch.Tensor) -> None:
        if index in self._entries:
            raise ValueError(f"batch {index} recorded twice: the block ran twice in one forward")
        data = x.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().data  # [bytes]
        done = 0
        while done < data.nbytes:
            done += os.pwrite(self._file.fileno(), data[done:], self._end + done)
        self._entries[index] = (self._end, tuple(x.shape), x.dtype)
        self._end += data.nbytes

    def read(self, index: int, device: torch.device) -> torch.Tensor:
        """The tensor of batch `index`, in a fresh tensor of its recorded shape and dtype."""
        offset, shape, dtype = self._entries[index]
        out = torch.empty(shape, dtype=dtype)
        buf = out.view(-1).view(torch.uint8).numpy().data
        done = 0
        while done < buf.nbytes:
            n = os.preadv(self._file.fileno(), [buf[done:]], offset + done)
            if n <= 0:
                raise OSError(f"replay scratch file ended after {done} of {buf.nbytes} bytes")
            done += n
        return out.to(device)

    def close(self) -> None:
        self._file.close()


def _as_replayable(output: Any) -> tuple[torch.Tensor, int | None] | None:
    """(tensor, number of trailing Nones, or None for a bare tensor) of a block output; None if not replayable."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) \
            and all(o is None for o in output[1:]):
        return output[0], len(output) - 1
    return None


class LayerReplay:
    """Recordings of one decoder layer's `adapter.blocks`; `plan` prepares each pass (see module docstring).

    `selected`: per group, the linears pruned in this layer (relative checkpoint names). A block is final for
    the pass of group g once every selected linear in it (its tail excepted) belongs to a group < g.
    `n_batches`: the batches of every pass; recordings go to unnamed files in `folder`.
    """

    def __init__(self, module: nn.Module, adapter: Adapter, selected: Sequence[Sequence[str]], n_batches: int,
                 folder: Path) -> None:
        self.module, self.blocks, self.n_batches, self.folder = module, adapter.blocks, n_batches, Path(folder)
        self.moe = adapter.moe
        self.module_path: Callable[[str], str] = adapter.moe.module_path if adapter.moe else str
        paths = [(g, self.module_path(n)) for g, names in enumerate(selected) for n in names]
        self._last = {b.path: max((g for g, p in paths if b.holds(p) and p != b.tail), default=-1)
                      for b in self.blocks}
        self.recorded: dict[str, tuple[_Scratch, int | None]] = {}  # block path -> (batches, trailing Nones)
        self.replays = 0  # block calls answered from a recording instead of recomputed

    def plan(self, group: int, hooked: Iterable[str] = (), routed: bool = False, record: bool = True) -> ReplayPass:
        """The pass that collects `group`'s statistics (`len(groups)`: the propagation pass, `record=False`).

        `hooked`: the linears this pass hooks (a block holding one, other than its tail, is neither replayed
        nor recorded); `routed`: the MoE block's experts are hooked too (so is the block holding them).
        """
        paths = [self.module_path(h) for h in hooked]
        moe_block = self.moe.block if routed and self.moe is not None else None

        def busy(b: Block) -> bool:
            inside = any(b.holds(p) and p != b.tail for p in paths)
            nested = moe_block is not None and (moe_block == b.path or b.holds(moe_block)
                                                 or b.path.startswith(moe_block + "."))
            return inside or nested

        replay = [b for b in self.blocks if b.path in self.recorded and not busy(b)]
        rec = [b for b in self.blocks if record and b.path not in self.recorded
               and self._last[b.path] < group and not busy(b)]
        return ReplayPass(self, replay, rec)

    def close(self) -> None:
        for scratch, _ in self.recorded.values():
            scratch.close()
        self.recorded.clear()


class ReplayPass:
    """One pass over the calibration batches: replayed blocks return their recordings (their `forward` is
    replaced on the instance for the pass), recorded blocks write theirs; `start_batch(i)` before batch i."""

    def __init__(self, owner: LayerReplay, replay: Sequence[Block], record: Sequence[Block]) -> None:
        self.owner, self.replay, self.record = owner, tuple(replay), tuple(record)
        self._index = -1
        self._current: dict[str, torch.Tensor] = {}
        self._new: dict[str, tuple[_Scratch, int | None]] = {}
        self._failed: set[str] = set()
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> ReplayPass:
        for b in self.replay:
            self._override(get_submodule(self.owner.module, b.path), self._replayer(b))
        for b in self.record:
            if b.tail is None:
                h = get_submodule(self.owner.module, b.path).register_forward_hook(self._output_recorder(b))
            else:  # prepended: runs before a statistics hook that stops the forward at the tail
                h = get_submodule(self.owner.module, b.tail).register_forward_pre_hook(
                    self._input_recorder(b), prepend=True)
            self._undo.append(h.remove)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for undo in reversed(self._undo):
            undo()
        self._current.clear()
        for path, (scratch, extra) in self._new.items():
            if exc_type is None and path not in self._failed and len(scratch) == self.owner.n_batches:
                self.owner.recorded[path] = (scratch, extra)
            else:  # the block did not run for every batch (e.g. it comes after the hooked linears)
                scratch.close()

    def start_batch(self, index: int, device: torch.device) -> None:
        """Batch `index` is next: load the recordings the replayed blocks will return."""
        self._index = index
        for b in self.replay:
            self._current[b.path] = self.owner.recorded[b.path][0].read(index, device)

    def _override(self, mod: nn.Module, fn: Callable[..., Any]) -> None:
        saved = mod.__dict__.get("forward")
        mod.forward = fn  # an instance attribute: nn.Module.__call__ (and its hooks) calls it

        def undo() -> None:
            if saved is None:
                del mod.forward
            else:
                mod.forward = saved

        self._undo.append(undo)

    def _replayer(self, b: Block) -> Callable[..., Any]:
        extra = self.owner.recorded[b.path][1]
        tail = get_submodule(self.owner.module, b.tail) if b.tail is not None else None

        def forward(*args: Any, **kwargs: Any) -> Any:
            x = self._current.pop(b.path)
            self.owner.replays += 1
            if tail is not None:
                return tail(x)
            return x if extra is None else (x, *([None] * extra))

        return forward

    def _store(self, b: Block, x: torch.Tensor, extra: int | None) -> None:
        if b.path not in self._new:
            self._new[b.path] = (_Scratch(self.owner.folder), extra)
        elif self._new[b.path][1] != extra:
            self._failed.add(b.path)
            return
        self._new[b.path][0].append(self._index, x)

    def _output_recorder(self, b: Block) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            got = _as_replayable(output)
            if got is None:
                self._failed.add(b.path)
            elif b.path not in self._failed:
                self._store(b, got[0], got[1])

        return hook

    def _input_recorder(self, b: Block) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if len(args) == 1 and isinstance(args[0], torch.Tensor) and b.path not in self._failed:
                self._store(b, args[0], None)
            else:
                self._failed.add(b.path)

        return hook
