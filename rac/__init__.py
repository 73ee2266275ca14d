"""rac: Reasoning-Aware Compression of reasoning LLMs (one-shot pruning calibrated on on-policy CoTs)."""

__version__ = "0.2.0"  # the one version (pyproject reads it); part of every stage key
