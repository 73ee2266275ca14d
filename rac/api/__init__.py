"""The Python API for notebooks: calibrate, prune, evaluate and benchmark on in-memory objects, typed results.

    import rac.api
    cal = rac.api.calibrate("tiny-llama", ["What is 2 + 3?", "What is 7 - 4?"], kind="prompt", token_budget=64)
    pruned = rac.api.prune("tiny-llama", cal, method="sparsegpt", sparsity=0.5)
    ev = rac.api.evaluate(pruned, [{"prompt": "What is 2 + 3?", "answer": "5"}])

The same stages, cache, work dir and index as the `rac` CLI (docs/python-api.md); `rac eval RUN --harness
lm-eval` is `rac.api.harness`.
"""

from rac.api.benchmarks import HarnessPlan, harness, plan_harness, run_plan
from rac.api.inputs import ApiError, Prompts
from rac.api.notebook import calibrate, evaluate, prune
from rac.api.results import Calibration, CalibSequence, EvalResult, HarnessResult, PrunedModel

__all__ = ["ApiError", "CalibSequence", "Calibration", "EvalResult", "HarnessPlan", "HarnessResult", "Prompts",
           "PrunedModel", "calibrate", "evaluate", "harness", "plan_harness", "prune", "run_plan"]
