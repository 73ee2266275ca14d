"""The shared set-up in conftest.py does what it says: private Prefect home, per-test seeds, `--reverse`."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONFTEST = Path(__file__).with_name("conftest.py")


def test_prefect_home_is_private() -> None:
    home = Path(os.environ["PREFECT_HOME"])
    assert home.parent == Path(tempfile.gettempdir()) and home.name.startswith("rac-prefect-home-")
    assert home.is_dir() and home != Path.home() / ".prefect"
    from prefect.settings import PREFECT_HOME, get_current_settings

    assert Path(PREFECT_HOME.value()).resolve() == home.resolve()
    assert Path(get_current_settings().home).resolve() == home.resolve()


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(()))


def _reference_draws(seed: int = 0) -> tuple[float, float, float]:
    """What a fresh generator of each library seeded with `seed` draws first."""
    g = torch.Generator().manual_seed(seed)
    return (random.Random(seed).random(), float(np.random.RandomState(seed).random_sample()),
            float(torch.rand((), generator=g)))


def test_rngs_are_seeded_before_each_test_a() -> None:
    assert _draws() == _reference_draws()
    _draws()  # consume more: the next test must not see it


def test_rngs_are_seeded_before_each_test_b() -> None:
    assert _draws() == _reference_draws()


def test_reverse_option_and_home_cleanup(tmp_path: Path) -> None:
    """Separate pytest runs with this conftest: `--reverse` flips the collection order, each session's
    Prefect home (made under TMPDIR) is gone once the run exits, and a killed session's home is reaped."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_order.py").write_text("".join(f"def test_{c}():\n    pass\n\n" for c in "abc"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid whose process has exited
    stale, young = tmp / f"rac-prefect-home-pid{dead}-old", tmp / f"rac-prefect-home-pid{dead}-new"
    for d in (stale, young):
        (d / "db").mkdir(parents=True)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("PREFECT_HOME")

    def order(*extra: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
             "--collect-only", *extra, str(tmp_path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return [line.split("::")[1] for line in out.stdout.splitlines() if "::" in line]

    assert order() == ["test_a", "test_b", "test_c"]
    assert order("--reverse") == ["test_c", "test_b", "test_a"]
    # Both runs removed their own Prefect homes, and the first reaped the stale home of a dead session
    # (a young one is kept: its pid may belong to another pid namespace sharing /tmp).
    assert list(tmp.iterdir()) == [young]
