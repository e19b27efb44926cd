"""Test session set-up.

Without a GPU the Triton kernels run in Triton's CPU interpreter. ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is defined, so it must be set before saei_fast's kernel
modules are imported; conftest runs before any test module is collected.
"""

import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
