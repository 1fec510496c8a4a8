"""The wheel `pip install .` builds carries every file the installed service reads besides its
modules: the migrations (`rebalancer db migrate` from an image), the built-in specs, the default
configuration and world, the dashboard's static files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ("events/sql/*.sql", "rebalancer/specs/builtin/*.yaml", "rebalancer/defaults/*.yaml",
        "rebalancer/web/static/*")


def test_the_wheel_carries_the_migrations_and_every_data_file(tmp_path: Path) -> None:
    # Built from a copy: a `build/` left in the checkout would hand back files of an old build.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("events", "projections", "rebalancer"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel, = tmp_path.glob("rebalancer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pattern in DATA:
        wanted = {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)}
        assert wanted, pattern
        assert wanted <= names, sorted(wanted - names)
