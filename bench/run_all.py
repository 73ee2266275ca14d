"""`make bench`: run every benchmark module that exists, each writing into bench/results/.

Each module `bench.<name>` exposes `main(results_dir: Path) -> None`. Modules not written yet are
skipped with a note; an import error inside an existing module is raised, not skipped.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

BENCH_MODULES: tuple[str, ...] = ("solvers", "engine", "generation", "scaling")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(results_dir: Path = RESULTS_DIR) -> int:
    """Run the benchmarks in BENCH_MODULES order; returns the number run."""
    results_dir.mkdir(parents=True, exist_ok=True)
    ran = 0
    for name in BENCH_MODULES:
        module_name = f"bench.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            print(f"[bench] {module_name}: not present, skipped", flush=True)
            continue
        start = time.perf_counter()
        print(f"[bench] {module_name}: running", flush=True)
        module.main(results_dir)
        print(f"[bench] {module_name}: done in {time.perf_counter() - start:.1f} s", flush=True)
        ran += 1
    return ran


if __name__ == "__main__":
    main()
    sys.exit(0)
