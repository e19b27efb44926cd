"""The CPU path's extra memory does not grow with N x V (measured, not assumed).

Each measurement runs in a fresh interpreter so that memory freed by earlier work and kept
by the allocator cannot hide an allocation.
"""

from __future__ import annotations

import pytest

from saei_fast.memory import rss_tracking_available, run_isolated
from saei_fast.ops.entropy.torch_path import CHUNK_ELEMENTS

_SCRIPT = """
import json, sys, torch
from saei_fast.memory import peak_memory_of
from saei_fast.ops import entropy
from saei_fast.reference import naive_entropy

n, v, provider, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
logits = torch.randn(n, v)
fn = (lambda t: entropy(t, impl="torch")) if provider == "ours" else naive_entropy

def run():
    if mode == "forward":
        with torch.no_grad():
            fn(logits)
    else:
        leaf = logits.detach().requires_grad_(True)
        fn(leaf).sum().backward()

run()  # warm-up: one-time allocations (thread pools, kernels) are not the op's
print(json.dumps({"peak": peak_memory_of(run), "logits": logits.numel() * 4}))
"""


def _peak(n: int, v: int, provider: str, mode: str) -> dict:
    return run_isolated(_SCRIPT, n, v, provider, mode)


@pytest.mark.skipif(not rss_tracking_available(), reason="needs Linux /proc RSS high-water mark")
def test_cpu_forward_extra_memory_is_bounded():
    naive = _peak(1024, 32000, "naive", "forward")
    # Naive allocates several [N, V] fp32 temporaries; ours a few fixed-size chunk buffers.
    assert naive["peak"] > 2 * naive["logits"]
    # The bound does not depend on N: a few chunk buffers plus allocator slack (the RSS
    # high-water mark moves with how glibc reuses freed chunks, hence the generous factor).
    bound = 8 * CHUNK_ELEMENTS * 4
    for n in (1024, 4096):
        ours = _peak(n, 32000, "ours", "forward")
        assert ours["peak"] < bound, (n, ours)
        assert ours["peak"] < 0.05 * naive["peak"] * n / 1024


@pytest.mark.skipif(not rss_tracking_available(), reason="needs Linux /proc RSS high-water mark")
def test_cpu_backward_extra_memory_is_the_gradient_plus_chunks():
    ours = _peak(1024, 32000, "ours", "backward")
    naive = _peak(1024, 32000, "naive", "backward")
    gradient = ours["logits"]  # the [N, V] gradient itself must exist
    assert ours["peak"] < gradient + 0.1 * (naive["peak"] - gradient)
