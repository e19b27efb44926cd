"""Entropy (+ label log-probs) from logits: ours vs naive, chunked (TRL- and verl-style) and
compiled PyTorch, TRL's own function and, on CUDA, the loss-only peers when installed.

The cases (providers, shapes per device, bytes moved) are
``saei_fast.benchmarks.entropy_cases``, shared with ``saei-fast bench``.
"""

from __future__ import annotations

import pytest
from benchutil import DEVICE, QUICK, bench_case

from saei_fast.benchmarks import cases_for

CASES = cases_for(["entropy"], DEVICE, quick=QUICK)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_entropy_from_logits(benchmark, case):
    bench_case(benchmark, case)
