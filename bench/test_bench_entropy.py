"""Entropy (+ label log-probs) from logits: ours vs naive, chunked and compiled PyTorch.

Memory-bound: the floor is reading the logits once (forward) and reading them again plus
writing the gradient (backward). ``extra_info`` holds those bytes, the achieved GB/s and
the peak extra memory of one call.
"""

from __future__ import annotations

import functools

import pytest
import torch
from benchutil import DEVICE, record, run_benchmark

from saei_fast.memory import peak_memory_of
from saei_fast.ops import logprobs_and_entropy
from saei_fast.reference import chunked_entropy, naive_logprobs_and_entropy

if DEVICE.type == "cuda":
    # Real RL shapes: 8192 completion tokens, Llama-3 and Qwen2 vocabularies, bf16 logits.
    SHAPES = [(4096, 151936), (8192, 128256), (8192, 151936)]
    DTYPE = torch.bfloat16
else:
    # Small enough that the whole file runs in about a minute on 2 cores.
    SHAPES = [(512, 32000), (128, 151936)]
    DTYPE = torch.float32


def _ours(logits, labels):
    logp, ent = logprobs_and_entropy(logits, labels, temperature=1.0)
    return ent.sum() + logp.sum()


def _naive(logits, labels):
    logp, ent = naive_logprobs_and_entropy(logits, labels)
    return ent.float().sum() + logp.float().sum()


def _chunked(logits, labels):
    ent = chunked_entropy(logits)
    logp = torch.cat(
        [
            torch.log_softmax(chunk.float(), -1).gather(-1, lab[:, None]).squeeze(-1)
            for chunk, lab in zip(logits.split(128), labels.split(128), strict=True)
        ]
    )
    return ent.sum() + logp.sum()


@functools.cache
def _compiled():
    return torch.compile(_naive)


PROVIDERS = {
    "ours": lambda: _ours,
    "naive": lambda: _naive,
    "chunked": lambda: _chunked,
    "compiled": _compiled,
}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
def test_entropy_from_logits(benchmark, provider, mode, n, v):
    benchmark.group = f"entropy-from-logits {mode} {n}x{v} {str(DTYPE).removeprefix('torch.')}"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(n, v, device=DEVICE, generator=gen).mul_(3).to(DTYPE)
    labels = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    fn = PROVIDERS[provider]()

    if mode == "forward":

        def call():
            with torch.no_grad():
                return fn(logits, labels)

        bytes_moved = logits.numel() * logits.element_size()
    else:
        leaf = logits.requires_grad_(True)

        def call():
            leaf.grad = None
            fn(leaf, labels).backward()

        # read (forward) + read (backward) + write the gradient
        bytes_moved = 3 * logits.numel() * logits.element_size()

    run_benchmark(benchmark, call)
    record(
        benchmark,
        bytes_moved=bytes_moved,
        provider=provider,
        shape=[n, v],
        dtype=str(DTYPE),
        peak_extra_memory_bytes=peak_memory_of(call, DEVICE),
    )
