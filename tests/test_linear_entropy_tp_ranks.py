"""Vocabulary-parallel linear entropy on 1 and 3 processes (gloo, file rendezvous), against
the unsharded op, with and without a mask.

test_linear_entropy_tp.py runs 2 ranks, where the second shard's offset is also the first
shard's size, and "the other rank" is one rank: a shard placed by ``sizes[0] * rank`` or by
the previous rank's size alone, or a reduction that only pairs ranks, gives the right answer
there. Three uneven shards (1, 20 and 16 rows of 37: a rank may hold a single vocabulary row)
tell those apart; one rank holding the whole vocabulary must give the unsharded values.
"""

from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saei_fast.ops.linear_entropy.op import (
    _linear_logprobs_and_entropy_variant as linear_logprobs_and_entropy_impl,
)

V, D = 37, 16
SHARDS = {1: [(0, 37)], 3: [(0, 1), (1, 21), (21, 37)]}


def _inputs(with_mask: bool):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.4
    bias = torch.randn(V, generator=gen)
    labels = torch.randint(0, V, (2, 6), generator=gen)
    labels[0] = torch.tensor([0, 1, 2, 20, 21, 36])  # every shard edge
    mask = torch.rand(2, 6, generator=gen) > 0.3 if with_mask else None
    if mask is not None:
        mask[0] = True
    upstream = torch.randn(2, 2, 6, generator=gen)
    return hidden, weight, bias, labels, mask, upstream


def _run(hidden, weight, bias, labels, mask, upstream, **kwargs):
    leaf = hidden.clone().requires_grad_(True)
    head = [weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)]
    logp, ent = linear_logprobs_and_entropy_impl(
        leaf, head[0], labels, bias=head[1], temperature=0.9, mask=mask, **kwargs
    )
    (upstream[0] * ent + upstream[1] * logp).sum().backward()
    return ent, logp, leaf.grad, head[0].grad, head[1].grad


def _worker(rank: int, rendezvous: str, world: int) -> None:
    # Eager PyTorch path: compiling its kernels in every spawned process would cost more
    # than the check (test_linear_entropy_tp.py runs the compiled path on 2 ranks).
    if world > 1:
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        os.environ["SAEI_CPU_COMPILE"] = "0"
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        lo, hi = SHARDS[world][rank]
        for with_mask in (False, True):
            hidden, weight, bias, labels, mask, upstream = _inputs(with_mask)
            full = _run(hidden, weight, bias, labels, mask, upstream, impl="torch")
            sharded = _run(
                hidden, weight[lo:hi], bias[lo:hi], labels, mask, upstream, impl="torch",
                process_group=dist.group.WORLD,
            )  # fmt: skip
            names = ("entropy", "logprobs", "grad hidden", "grad weight", "grad bias")
            for name, ours, truth in zip(names, sharded, full, strict=True):
                if name in ("grad weight", "grad bias"):
                    truth = truth[lo:hi]
                case = f"{name}, rank {rank} of {world}, mask {with_mask}"
                torch.testing.assert_close(ours, truth, atol=2e-6, rtol=1e-5, msg=case)
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)


def test_vocab_parallel_on_three_ranks_matches_unsharded_op(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), 3), nprocs=3, join=True)


def test_vocab_parallel_on_one_rank_is_the_unsharded_op(tmp_path):
    """A process group of one (in this process: no spawn needed)."""
    _worker(0, str(tmp_path / "rendezvous"), 1)
