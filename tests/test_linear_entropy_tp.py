"""Vocabulary-parallel linear entropy: 2 processes, gloo with a file rendezvous, against the
unsharded op.

Each rank holds an uneven shard of the lm_head (rows [0, 20) and [20, 37) of 37) and must
get the exact full-vocabulary entropy and log-probs, the full gradient w.r.t. hidden and
its own shard of the weight / bias gradients. The rendezvous is a file in the test's own
temporary folder (no port to race for), and nothing is retried: any failure inside a rank
fails the test.
"""

from __future__ import annotations

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saei_fast.ops.dispatch import triton_available, triton_interpreting
from saei_fast.ops.linear_entropy.op import (
    _linear_logprobs_and_entropy_variant as linear_logprobs_and_entropy_impl,
)

WORLD = 2
V, D = 37, 24
SHARDS = [(0, 20), (20, 37)]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.4
    bias = torch.randn(V, generator=gen)
    labels = torch.randint(0, V, (3, 7), generator=gen)
    labels[0, :4] = torch.tensor([0, 19, 20, 36])  # both shard edges
    mask = torch.rand(3, 7, generator=gen) > 0.25
    mask[0, :4] = True
    g_entropy = torch.randn(3, 7, generator=gen)
    g_logprobs = torch.randn(3, 7, generator=gen)
    return hidden, weight, bias, labels, mask, g_entropy, g_logprobs


def _run(hidden, weight, bias, labels, mask, g_entropy, g_logprobs, *, trainable, **kwargs):
    """Values and gradients of one call; the lm_head is trainable or frozen."""
    leaf = hidden.clone().requires_grad_(True)
    head = [weight.clone().requires_grad_(trainable), bias.clone().requires_grad_(trainable)]
    logp, ent = linear_logprobs_and_entropy_impl(
        leaf, head[0], labels, bias=head[1], temperature=0.8, mask=mask, **kwargs
    )
    loss = (g_entropy * ent).sum()
    if logp is not None:
        loss = loss + (g_logprobs * logp).sum()
    loss.backward()
    return ent, logp, leaf.grad, head[0].grad, head[1].grad


def _check_case(rank, impl, with_labels, trainable):
    hidden, weight, bias, labels, mask, g_entropy, g_logprobs = _inputs()
    labels = labels if with_labels else None
    full = _run(
        hidden, weight, bias, labels, mask, g_entropy, g_logprobs, trainable=trainable, impl=impl
    )
    lo, hi = SHARDS[rank]
    sharded = _run(
        hidden, weight[lo:hi], bias[lo:hi], labels, mask, g_entropy, g_logprobs,
        trainable=trainable, impl=impl, process_group=dist.group.WORLD,
    )  # fmt: skip
    case = f"rank {rank}, impl {impl}, labels {with_labels}, trainable {trainable}"
    names = ("entropy", "logprobs", "grad hidden", "grad weight", "grad bias")
    for name, ours, truth in zip(names, sharded, full, strict=True):
        if truth is None:
            assert ours is None, f"{name} should be None ({case})"
            continue
        if name in ("grad weight", "grad bias"):
            truth = truth[lo:hi]
        torch.testing.assert_close(ours, truth, atol=2e-6, rtol=1e-5, msg=f"{name} ({case})")
    assert torch.all(sharded[0][~mask] == 0)


def _worker(rank: int, rendezvous: str, impl: str) -> None:
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # interpreter: 0 * inf
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        if impl == "torch":
            _check_case(rank, "torch", with_labels=True, trainable=True)
            _check_case(rank, "torch", with_labels=False, trainable=False)
            _check_case(rank, "torch", with_labels=False, trainable=True)
        else:
            # The fused kernels behind the same collectives.
            _check_case(rank, "triton", with_labels=True, trainable=True)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, impl: str) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), impl), nprocs=WORLD, join=True)


pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)


def test_vocab_parallel_matches_unsharded_op(tmp_path):
    _spawn(tmp_path, "torch")


@pytest.mark.triton
@pytest.mark.skipif(
    not (triton_available() and triton_interpreting()),
    reason="the gloo workers hold CPU tensors, which the Triton kernels take only under "
    "TRITON_INTERPRET=1 (tests/conftest.py sets it on machines without a GPU)",
)
def test_vocab_parallel_triton_kernels_match_unsharded_op(tmp_path):
    _spawn(tmp_path, "triton")
