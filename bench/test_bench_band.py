"""Entropy-rank band mask: ours vs per-row torch.sort and torch.quantile thresholding.

Latency-bound (a few bytes per token), so the interesting numbers are ms and the host
syncs: ours keeps n, the ranks and the boundaries on the device (the public function's
NaN check is its one sync; the registered op alone, as torch.compile runs it, has none),
while quantile thresholding needs the valid tokens gathered by boolean indexing. extra_info
records the valid tokens, the minimum bytes (read entropy + mask, write the mask once)
and, on CUDA, the host syncs of one call.
"""

from __future__ import annotations

import pytest
from benchutil import DEVICE, record, run_benchmark
from gpu_band import CASES, CUDA_SHAPES, band_inputs, count_host_syncs, provider

# CPU: the shapes with 4x fewer rows, so the file runs in well under a minute.
SHAPES = CUDA_SHAPES if DEVICE.type == "cuda" else [(16, 1024), (16, 4096), (4, 16384)]
IMPL = "triton" if DEVICE.type == "cuda" else "torch"


@pytest.mark.parametrize("name,scope", CASES, ids=[f"{name}-{scope}" for name, scope in CASES])
@pytest.mark.parametrize("rows,width", SHAPES, ids=[f"{r}x{w}" for r, w in SHAPES])
def test_band_mask(benchmark, name, scope, rows, width):
    benchmark.group = f"band-mask {rows}x{width}"
    entropy, mask = band_inputs(rows, width, DEVICE)
    fn = provider(name, scope, IMPL)
    run_benchmark(benchmark, lambda: fn(entropy, mask))
    record(
        benchmark,
        bytes_moved=entropy.numel() * (entropy.element_size() + 2),
        valid_tokens=int(mask.sum()),
        scope=scope,
        host_syncs=count_host_syncs(lambda: fn(entropy, mask)),
    )
