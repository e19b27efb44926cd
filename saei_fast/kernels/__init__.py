"""Triton kernels and their launchers only: no autograd, no models.

Importing a module here imports Triton; the ``saei_fast.ops`` layer imports them lazily so
that the package works (on its PyTorch path) where Triton is not installed.

The kernel modules live in the repository's top-level ``kernels/`` folder (device code apart
from host code) and install here through setuptools' ``package-dir``. That folder has no
``__init__.py`` on purpose: a regular package named ``kernels`` at the repository root would
shadow the ``kernels`` distribution (Hugging Face's, which transformers imports) whenever the
root is on ``sys.path``. This file is the package's ``__init__`` instead: ``setup.py`` puts it
into the wheel, and an editable install finds it here while the kernel modules resolve
through setuptools' mapping of ``saei_fast.kernels`` to ``kernels/``.
"""
