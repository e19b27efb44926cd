"""Entropy (+ label log-probs) from logits: ours vs naive, chunked (TRL- and verl-style) and
compiled PyTorch (``torch.compile`` of the naive formula, forward and forward+backward),
TRL's own ``entropy_from_logits`` and, on CUDA, TRL 1.16's Triton
``selective_log_softmax_and_entropy`` and the loss-only peers when installed (skipped here
with the reason otherwise).

The cases (providers, shapes per device, bytes moved) are
``saei_fast.tools.benchmarks.entropy_cases``, shared with ``saei-fast bench``.
"""

from __future__ import annotations

import pytest
from benchutil import DEVICE, QUICK, bench_case

from saei_fast.tools.benchmarks import cases_for

CASES = cases_for(["entropy"], DEVICE, quick=QUICK)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_entropy_from_logits(benchmark, case):
    bench_case(benchmark, case)
