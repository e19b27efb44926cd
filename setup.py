"""Build hook: the ``saei_fast.kernels`` package takes its modules from the top-level
``kernels/`` folder (``package-dir`` in pyproject.toml) and its ``__init__.py`` from
``saei_fast/kernels/``, so that ``kernels/`` itself is not a regular package that would shadow
the ``kernels`` distribution from the repository root. Everything else is in pyproject.toml.
"""

from setuptools import setup
from setuptools.command.build_py import build_py

KERNELS_PACKAGE = "saei_fast.kernels"
KERNELS_INIT = "saei_fast/kernels/__init__.py"


class BuildPy(build_py):
    """setuptools' build_py, with the kernels package's ``__init__`` taken from the host tree."""

    def check_package(self, package, package_dir):
        if package == KERNELS_PACKAGE:
            return KERNELS_INIT
        return super().check_package(package, package_dir)

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == KERNELS_PACKAGE:
            modules.append((package, "__init__", KERNELS_INIT))
        return modules


setup(cmdclass={"build_py": BuildPy})
