"""Benchmarks (`make bench` runs `python -m bench.run_all`); results go to bench/results/.

On a machine whose cores are shared with other jobs, GNU OpenMP's default spin-waiting makes every
small multi-threaded torch op wait for a descheduled sibling thread (measured here: the per-column
SparseGPT loop 30x slower at 2 threads). Benchmarks therefore default to passive waiting; the
variable must be set before torch is imported, which importing this package first guarantees for
`python -m bench...`. An explicit OMP_WAIT_POLICY in the environment wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
