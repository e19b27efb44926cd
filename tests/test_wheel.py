"""The wheel holds every subpackage, the Triton kernels included.

The kernels live in the top-level ``kernels/`` folder and install as ``saei_fast.kernels``
through setuptools' ``package-dir``, with that package's ``__init__.py`` taken from
``saei_fast/kernels/`` by ``setup.py``; an editable install finds them either way, so only a
built wheel shows whether a packaging change dropped them. The wheel is built offline from a
copy of the sources (setuptools writes ``build/`` and ``*.egg-info`` next to them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _subpackages() -> set[str]:
    """Every package under saei_fast/ and kernels/ in the source tree, by import name."""
    found = {"saei_fast", "saei_fast.kernels"}
    for init in (ROOT / "saei_fast").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for init in (ROOT / "kernels").rglob("__init__.py"):
        found.add(".".join(("saei_fast", *init.parent.relative_to(ROOT).parts)))
    return {name for name in found if "__pycache__" not in name}


def test_wheel_contains_the_kernels_and_every_subpackage(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("saei_fast", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("--no-index", "-w", str(tmp_path / "dist"), str(source)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("saei_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    kernel_modules = {
        path.relative_to(ROOT / "kernels").as_posix()
        for path in (ROOT / "kernels").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert {"entropy/kernels.py", "linear_entropy/kernels.py", "band/kernels.py"} <= kernel_modules
    for module in (*kernel_modules, "__init__.py"):
        assert f"saei_fast/kernels/{module}" in names
    init = zipfile.ZipFile(wheel).read("saei_fast/kernels/__init__.py").decode()
    assert init == (ROOT / "saei_fast" / "kernels" / "__init__.py").read_text()
    assert not any(name.startswith("kernels/") for name in names)  # no stray top-level package
    packages = {name.rsplit("/", 1)[0].replace("/", ".") for name in names if name.endswith(".py")}
    missing = _subpackages() - packages
    assert not missing, f"subpackages missing from the wheel (pyproject packages?): {missing}"
