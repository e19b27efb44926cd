"""pytest-benchmark set-up for `pytest bench/` (helpers live in benchutil.py).

The cases, and the shapes they use on this device (CPU: the whole suite in a few minutes;
CUDA: real RL shapes), come from the registry in ``saei_fast.tools.benchmarks``;
``SAEI_BENCH_QUICK=1`` selects its ``--quick`` shapes.
"""

from __future__ import annotations

import pytest
import torch
from benchutil import DEVICE


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE
