"""Evaluation: answer grading, accuracy/length metrics, per-token reconstruction error."""
