"""rac: Reasoning-Aware Compression of reasoning LLMs (one-shot pruning calibrated on on-policy CoTs)."""

__version__ = "0.1.0"
