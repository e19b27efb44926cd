"""Entropy attack on a random-weight Qwen2.5-VL-shaped model: ours (whole group and
micro-batched) vs the naive way (full logits, parameter gradients).

``extra_info`` holds the peak extra memory of one call, measured in this process (allocator
reuse can hide some of it; ``bench/measure_attack_memory.py`` measures each provider in a
fresh interpreter for the figures in RESULTS.md). Cases: ``saei_fast.tools.benchmarks.attack_cases``
(shared with ``saei-fast bench``).
"""

from __future__ import annotations

import pytest
from benchutil import DEVICE, QUICK, bench_case

from saei_fast.tools.benchmarks import cases_for

CASES = cases_for(["attack"], DEVICE, quick=QUICK)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_entropy_attack(benchmark, case):
    bench_case(benchmark, case)
