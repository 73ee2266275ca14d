"""Process-level memory settings of a long engine run (glibc heap trimming, mmap threshold, huge pages for
torch's CPU tensors, gc freeze)."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def trim_heap(collect: bool = False) -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`; no-op elsewhere), so fragmentation from
    one step's transient buffers does not add to the next step's peak. With `collect`, first free the
    reference cycles a step leaves (e.g. ctypes objects of `safetensors.torch.save_file`)."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 4 << 20


@contextmanager
def memory_hygiene() -> Iterator[None]:
    """Process settings that keep a long run's RSS at its working set (measured on a 1B model: peak
    1.7 GiB -> 1.1 GiB):
    - glibc's mmap threshold is fixed at 4 MiB (unless MALLOC_MMAP_THRESHOLD_ is set): by default it
      grows to 32 MiB, so the many 4-32 MiB transient tensors come from the brk heap, which fragments and
      keeps touching fresh pages (its free part stayed resident, +50 MiB per layer). Left set afterwards
      (mallopt cannot restore the dynamic default); it only makes big allocations use mmap.
    - torch's CPU tensors of >= 2 MiB get transparent huge pages (`use_huge_pages`): every batch's layer
      intermediates are fresh mmaps above that threshold, and faulting them in 4 KiB at a time was a sixth
      of the run's time (bench/results/profile.md).
    - the objects that exist now (imported libraries: ~0.4M objects, 0.2 s per full collection) are hidden
      from the garbage collector (`gc.freeze`), so the per-step `gc.collect()` only walks what the run
      allocates; undone at the end unless the caller had frozen already.
    """
    if _LIBC is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    use_huge_pages()
    global _owned_freezes
    if gc.get_freeze_count() > 0:
        yield
        return
    gc.freeze()
    _owned_freezes += 1
    try:
        yield
    finally:
        _owned_freezes -= 1
        gc.unfreeze()


_owned_freezes = 0  # memory_hygiene contexts that froze the collector themselves (and unfreeze it at the end)


def freeze_new_objects() -> None:
    """Hide the objects created since `memory_hygiene` froze the collector (the model skeleton, and the model
    code transformers imports while building it) from later collections too: without this every per-step
    `gc.collect()` walks them again (measured: 5.2 s of 237 s on SmolLM2-135M). Undone with the first freeze
    when `memory_hygiene` ends; a no-op outside it, or when the caller had frozen before (its objects stay
    the caller's business)."""
    if _owned_freezes > 0:
        gc.freeze()


THP_ENV = "THP_MEM_ALLOC_ENABLE"  # torch (c10/core/impl/alloc_cpu.cpp): madvise(MADV_HUGEPAGE) on allocations >= 2 MiB
_thp_warned = False


def use_huge_pages() -> bool:
    """Ask torch's CPU allocator for transparent huge pages on its allocations of >= 2 MiB and report whether a
    4 MiB probe tensor got them (its mapping advised `hg` in /proc/self/smaps).

    torch reads THP_MEM_ALLOC_ENABLE once, at its first such allocation, so `import rac` sets it (unless the
    variable is already set: `0` turns it off) before any big tensor of the run. Measured on SmolLM2-135M (float32,
    group order): CPU time -21%, minor faults -64%, peak RSS unchanged (glibc's own huge pages,
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1, saved as much but cost +150 MiB of peak RSS, and must be set
    before the process starts). When it cannot take effect (the process allocated a big tensor before, THP
    is off in the kernel, not Linux) a RuntimeWarning says so once per process; nothing else changes.
    """
    global _thp_warned
    if not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault(THP_ENV, "1")  # `import rac` already sets it (rac/__init__.py), before any big tensor
    active = _probe_huge_pages()
    if not active and os.environ[THP_ENV] != "0" and not _thp_warned:
        _thp_warned = True
        warnings.warn(f"torch's CPU tensors get no transparent huge pages in this process (it read {THP_ENV} "
                      "before rac set it, or THP is off: /sys/kernel/mm/transparent_hugepage/enabled); set "
                      f"{THP_ENV}=1 before the first large tensor for fewer page faults (about -20% run time)",
                      RuntimeWarning, stacklevel=4)
    return active


def _probe_huge_pages() -> bool:
    """Whether a fresh 4 MiB torch tensor lies in a mapping advised for huge pages (VmFlags `hg`)."""
    import torch

    probe = torch.empty(4 << 20, dtype=torch.uint8)
    addr = probe.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:  # a mapping's header line: start-end perms ...
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and line.startswith("VmFlags:"):
                    return " hg" in line
    except OSError:
        return False
    return False
