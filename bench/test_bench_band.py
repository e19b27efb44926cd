"""Entropy-rank band mask: ours vs per-row torch.sort and torch.quantile thresholding.

Latency-bound; ``extra_info`` records the valid tokens, the minimum bytes and, on CUDA, the
host syncs of one call. Cases: ``saei_fast.tools.benchmarks.band_cases`` (shared with
``saei-fast bench``).
"""

from __future__ import annotations

import pytest
from benchutil import DEVICE, QUICK, bench_case

from saei_fast.tools.benchmarks import cases_for
from saei_fast.tools.benchmarks.band_cases import count_host_syncs

CASES = cases_for(["band"], DEVICE, quick=QUICK)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_band_mask(benchmark, case):
    inputs = bench_case(benchmark, case)
    fn = case.provider.make()
    benchmark.extra_info["host_syncs"] = count_host_syncs(lambda: fn(**inputs))
