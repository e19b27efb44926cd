"""Entropy from hidden states + lm_head: ours vs naive, chunked PyTorch and (CUDA) peers.

GEMM-bound, so ``extra_info`` holds TFLOP/s: on the nominal work (``2NDV`` forward,
``4NDV`` forward + backward to hidden) and on the FLOPs the provider really executes
(``6NDV`` for a backward that recomputes the logits). The lm_head is frozen, as in the
entropy attack: the backward is to ``hidden`` only. ``extra_info`` also holds the peak
extra memory of one call.

Providers: ``ours`` (automatic dispatch: fused Triton kernels on CUDA, chunked PyTorch on
CPU), on CUDA also ``ours-chunked`` (matmul + logits kernels) and ``ours-recompute`` (the
backward recomputes each chunk instead of taking ``dH/dhidden`` from the forward); ``naive``
(``F.linear`` + eager entropy), ``chunked`` (fused-linear-for-PPO style, checkpointed token
chunks); peers when installed on CUDA: Liger-Kernel's and cut-cross-entropy's fused linear
cross-entropy, the cost of a loss without entropy. A missing peer is skipped with a reason.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from benchutil import DEVICE, record, run_benchmark

from saei_fast.memory import peak_memory_of
from saei_fast.ops.linear_entropy import linear_logprobs_and_entropy_impl
from saei_fast.reference import chunked_linear_entropy, naive_linear_entropy

if DEVICE.type == "cuda":
    # (N, D, V): 8192 completion tokens with the lm_heads of Qwen2.5-VL-3B / -7B and Llama-3-8B.
    SHAPES = [(8192, 2048, 151936), (8192, 3584, 152064), (8192, 4096, 128256)]
    DTYPE = torch.bfloat16
else:
    # Small enough that the whole file runs in well under a minute on 2 cores.
    SHAPES = [(256, 256, 32000)]
    DTYPE = torch.float32


def _ours(**options):
    def fn(hidden, weight, labels):
        return linear_logprobs_and_entropy_impl(hidden, weight, None, **options)[1].sum()

    return fn


def _naive(hidden, weight, labels):
    return naive_linear_entropy(hidden, weight).float().sum()


def _chunked(hidden, weight, labels):
    return chunked_linear_entropy(hidden, weight).sum()


def _liger(hidden, weight, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")


def _cce(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, labels, reduction="sum")


# provider: (function, needs CUDA, module that must be importable, recomputes in backward)
PROVIDERS = {
    "ours": (_ours(), False, None, False),
    "ours-chunked": (_ours(fused=False), True, None, False),
    "ours-recompute": (_ours(input_grad_in_forward=False), True, None, True),
    "naive": (_naive, False, None, False),
    "chunked": (_chunked, False, None, True),
    "liger-flce-loss": (_liger, True, "liger_kernel", False),
    "cce-loss": (_cce, True, "cut_cross_entropy", True),
}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("n,d,v", SHAPES, ids=[f"{n}x{d}x{v}" for n, d, v in SHAPES])
def test_linear_entropy(benchmark, provider, mode, n, d, v):
    fn, needs_cuda, module, recomputes = PROVIDERS[provider]
    if needs_cuda and DEVICE.type != "cuda":
        pytest.skip(f"{provider} is a CUDA-only provider")
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    benchmark.group = f"linear-entropy {mode} {n}x{d}x{v} {str(DTYPE).removeprefix('torch.')}"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(n, d, device=DEVICE, generator=gen).to(DTYPE)
    weight = (torch.randn(v, d, device=DEVICE, generator=gen) * d**-0.5).to(DTYPE)  # frozen
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=gen)

    if mode == "forward":

        def call():
            with torch.no_grad():
                return fn(hidden, weight, labels)

        flops = executed = 2 * n * d * v
    else:
        leaf = hidden.detach().requires_grad_(True)

        def call():
            leaf.grad = None
            fn(leaf, weight, labels).backward()

        flops = 4 * n * d * v
        executed = flops + (2 * n * d * v if recomputes else 0)

    run_benchmark(benchmark, call)
    median = benchmark.stats.stats.median
    record(
        benchmark,
        flops=flops,
        provider=provider,
        shape=[n, d, v],
        dtype=str(DTYPE),
        executed_TFLOP_per_s=round(executed / median / 1e12, 3),
        peak_extra_memory_bytes=peak_memory_of(call, DEVICE),
    )
