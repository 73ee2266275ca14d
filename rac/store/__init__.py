"""Artifacts (content-addressed files, the one atomic write) and the DuckDB index of a work dir."""
