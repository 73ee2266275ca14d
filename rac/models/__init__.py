"""Model adapters, streaming loaders and shipped small-model assets."""
