"""Shared pytest set-up: offline hubs, a private Prefect home, deterministic seeds, `--reverse`.

- Hubs: Hugging Face hub and datasets run offline.
- Prefect: PREFECT_HOME is a fresh temp folder for the whole session, set here at import time (pytest imports
  this conftest before any test module, so before anything imports prefect), and removed at interpreter exit
  (an atexit hook registered now runs after prefect's own, which are registered later). A session killed
  before atexit leaves its home behind; the next session removes it (homes are named after their pid).
- Seeds: every test starts with `random`, `numpy` and `torch` seeded to TEST_SEED, so no test depends on the
  draws of the tests that ran before it.
- `--reverse`: run the collected tests in reverse order (checks that the suite passes in any order).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

PREFECT_HOME_PREFIX = "rac-prefect-home-"


STALE_HOME_S = 3600


def _reap_stale_homes() -> None:
    """Remove the homes of earlier sessions that died without running atexit (SIGKILL, SIGTERM): each
    home is named after its session's pid; one whose process is gone and that is over an hour old (in case
    /tmp is shared with another pid namespace) is stale."""
    for d in Path(tempfile.gettempdir()).glob(f"{PREFECT_HOME_PREFIX}pid*-*"):
        try:
            pid = int(d.name[len(PREFECT_HOME_PREFIX) + 3:].split("-", 1)[0])
            if time.time() - d.stat().st_mtime < STALE_HOME_S:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, OSError):
            pass  # not ours to judge, or alive under another user


_reap_stale_homes()
PREFECT_HOME = tempfile.mkdtemp(prefix=f"{PREFECT_HOME_PREFIX}pid{os.getpid()}-")
os.environ["PREFECT_HOME"] = PREFECT_HOME  # always private: never the user's ~/.prefect
atexit.register(shutil.rmtree, PREFECT_HOME, ignore_errors=True)

TEST_SEED = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reverse", action="store_true", default=False,
                     help="run the collected tests in reverse order")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(autouse=True)
def _seed_rngs() -> None:
    """Seed `random`, `numpy` and `torch` (all devices) before every test."""
    import numpy as np
    import torch

    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)
