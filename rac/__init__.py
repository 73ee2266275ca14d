"""rac: Reasoning-Aware Compression of reasoning LLMs (one-shot pruning calibrated on on-policy CoTs)."""

import os as _os

__version__ = "0.2.0"  # the one version (pyproject reads it); part of every stage key

# Transparent huge pages for torch's CPU tensors of >= 2 MiB (fewer page faults in the layer forwards; see
# rac.engine.memory.use_huge_pages). torch reads the variable once, at its first such allocation, so it is set
# here, when rac is imported, before any large tensor of a rac run exists; `THP_MEM_ALLOC_ENABLE=0` keeps it off.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
