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

try:
    from hypothesis import settings

    # Property tests draw the same examples on every run (seeded from each test's name), so
    # a failure in CI reproduces locally; SAEI_HYPOTHESIS_PROFILE=explore searches afresh.
    settings.register_profile("ci", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("SAEI_HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis comes with the [test] extra
    pass

# Fixtures shared across test files (none autouse: each file opts in). tests/ is not a
# package; pytest puts it on sys.path before importing this conftest, so the name resolves.
pytest_plugins = ["shared_fixtures"]
