"""Thin Prefect tasks over the rac stage steps; they exchange artifact references, never tensors."""

from rac_prefect.tasks.stages import (
    build_calibration_task,
    evaluate_task,
    generate_cots_task,
    proxies_task,
    prune_task,
    report_task,
    sample_prompts_task,
    token_error_task,
)

__all__ = [
    "build_calibration_task",
    "evaluate_task",
    "generate_cots_task",
    "proxies_task",
    "prune_task",
    "report_task",
    "sample_prompts_task",
    "token_error_task",
]
