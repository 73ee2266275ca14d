"""The distribution builds with `python -m build` and its wheel installs and runs `rac --help` in a clean venv.

The venv has no site packages and gets the wheel with --no-deps: the machine has no network, and this
checks what the wheel itself carries (every package of pyproject, the `rac` entry point, the version),
since `rac --help` imports only the standard library.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import rac

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_clean_venv(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:  # a copy of the tracked tree: building never touches the checkout
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert wheel.name == f"rac_compress-{rac.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "rac = rac_prefect.flows.cli:main" in z.read(entry).decode()
    for package in meta["tool"]["setuptools"]["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "rac_prefect/tasks/stages.py" in names and "rac/runs/session.py" in names
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, text=True, timeout=300)
    helped = subprocess.run([str(env_dir / "bin" / "rac"), "--help"], capture_output=True, text=True, timeout=60,
                            cwd=str(tmp_path))
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "resume", "status", "sql", "report", "compare", "verify", "serve"):
        assert command in helped.stdout
    version = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import rac; print(rac.__version__, rac.__file__)"],
                             capture_output=True, text=True, timeout=60, cwd=str(tmp_path), check=True).stdout.split()
    assert version[0] == rac.__version__ and str(env_dir) in version[1]  # the installed copy, not the checkout
