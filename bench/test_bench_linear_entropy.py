"""Entropy from hidden states + lm_head: ours vs naive, chunked PyTorch and (CUDA) peers.

GEMM-bound, so ``extra_info`` holds TFLOP/s: on the nominal work (``2NDV`` forward,
``4NDV`` forward + backward to hidden) and, for providers whose backward recomputes the
logits, on the FLOPs really executed (``6NDV``). The lm_head is frozen, as in the entropy
attack: the backward is to ``hidden`` only. ``extra_info`` also holds the peak extra memory
of one call. Providers (ours, ours-chunked and ours-recompute on CUDA, naive, chunked, TRL
1.16's fused head ``ChunkedLogProbFunction`` (CPU too), and on CUDA when installed verl's
fused kernels and the loss-only Liger / cut-cross-entropy peers) and shapes:
``saei_fast.tools.benchmarks.linear_cases``, shared with ``saei-fast bench``.
"""

from __future__ import annotations

import pytest
from benchutil import DEVICE, QUICK, bench_case

from saei_fast.tools.benchmarks import cases_for

CASES = cases_for(["linear_entropy"], DEVICE, quick=QUICK)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_linear_entropy(benchmark, case):
    bench_case(benchmark, case)
