"""Pieces the op tests share: where they run, the implementations they run on, and the
warnings of Triton's CPU interpreter that they ignore."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", "triton"]

# Triton's CPU interpreter evaluates both sides of tl.where in numpy and warns about the
# side that is discarded (0 * inf, log 0). A test file sets ``pytestmark = INTERPRETER_WARNINGS``.
INTERPRETER_WARNINGS = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]
