"""Prefect flows: `rac_prune` (the whole DAG for one model) and `rac_eval` (evaluate one model)."""
