"""pytest-benchmark set-up for `pytest bench/` (helpers live in benchutil.py)."""

from __future__ import annotations

import pytest
import torch
from benchutil import DEVICE


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE
