"""The training lm_head (per-token GRPO-like loss, backward to hidden and the lm_head): the
loss head that forms its gradients in the forward vs the per-token op, TRL 1.16's fused head
and naive full logits. GEMM-bound: ``extra_info`` holds TFLOP/s on the nominal ``6NDV``
and the peak extra memory of one call. Cases: ``saei_fast.tools.benchmarks.linear_loss_cases``,
shared with ``saei-fast bench``.
"""

from __future__ import annotations

import pytest
from benchutil import DEVICE, QUICK, bench_case

from saei_fast.tools.benchmarks import cases_for

CASES = cases_for(["linear_loss"], DEVICE, quick=QUICK)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_linear_loss(benchmark, case):
    bench_case(benchmark, case)
