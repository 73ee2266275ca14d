"""Prefect-free run machinery: work dir and locks, run configs, memoised stages, resume, the run session."""
