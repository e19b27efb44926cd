"""The ops on a batch of one: a single token, given without any leading dimension (logits
``[V]``, hidden ``[D]``), values and gradients against float64 autograd.

The op tests elsewhere start at a few rows; one token is what a step with a one-token
completion and a batch of one hands the head, and the kernels' row splitting (the fewest
rows get the most programs per row) is at its extreme there.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_helpers import DEVICE, IMPLS, INTERPRETER_WARNINGS

import saei_fast
from saei_fast.ops.linear_entropy.op import (
    _linear_logprobs_and_entropy_variant as linear_logprobs_and_entropy_impl,
)
from saei_fast.reference import (
    linear_logprobs_and_entropy_reference,
    logprobs_and_entropy_reference,
)

pytestmark = INTERPRETER_WARNINGS


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [7, 2053, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_token_logits(impl, v, dtype):
    gen = torch.Generator().manual_seed(v)
    logits = (torch.randn(v, generator=gen) * 2).to(DEVICE, dtype)
    label = torch.tensor(v // 3, device=DEVICE)
    leaf = logits.clone().requires_grad_(True)
    logprob, entropy = saei_fast.logprobs_and_entropy(leaf, label, temperature=0.8, impl=impl)
    assert logprob.shape == entropy.shape == ()
    (0.7 * logprob - 1.3 * entropy).backward()
    truth = logits.detach().double().requires_grad_(True)
    true_lp, true_h = logprobs_and_entropy_reference(truth, label, temperature=0.8)
    (0.7 * true_lp - 1.3 * true_h).backward()
    torch.testing.assert_close(entropy.double(), true_h.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logprob.double(), true_lp.detach(), rtol=1e-5, atol=2e-5)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(leaf.grad.double(), truth.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "impl,fused", [("torch", True), ("triton", True), ("triton", False)],
    ids=["torch", "triton-fused", "triton-chunked"],
)  # fmt: skip
def test_one_token_hidden_state(impl, fused):
    gen = torch.Generator().manual_seed(3)
    d, v = 20, 131
    hidden = torch.randn(d, generator=gen).to(DEVICE)
    weight = (torch.randn(v, d, generator=gen) * (2 / math.sqrt(d))).to(DEVICE)
    bias = torch.randn(v, generator=gen).to(DEVICE)
    label = torch.tensor(57, device=DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logprob, entropy = linear_logprobs_and_entropy_impl(
        leaves[0], leaves[1], label, bias=leaves[2], temperature=1.2, impl=impl, fused=fused
    )
    assert logprob.shape == entropy.shape == ()
    (logprob + 0.5 * entropy).backward()
    truth = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    true_lp, true_h = linear_logprobs_and_entropy_reference(
        truth[0], truth[1], label, bias=truth[2], temperature=1.2
    )
    (true_lp + 0.5 * true_h).backward()
    torch.testing.assert_close(entropy.double(), true_h.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logprob.double(), true_lp.detach(), rtol=1e-5, atol=2e-5)
    for name, ours, want in zip(("hidden", "weight", "bias"), leaves, truth, strict=True):
        torch.testing.assert_close(ours.grad.double(), want.grad, rtol=1e-4, atol=2e-5, msg=name)
    # The loss head on the same single token: index 0, the same value and gradients.
    seen = []

    def token_loss(lp, h, index):
        seen.append(index.tolist())
        return lp + 0.5 * h

    leaf = hidden.clone().requires_grad_(True)
    loss = saei_fast.linear_token_loss(
        leaf, weight, label, token_loss, bias=bias, temperature=1.2, impl=impl
    )
    loss.backward()
    assert seen == [[0]]
    torch.testing.assert_close(loss.double(), (true_lp + 0.5 * true_h).detach(), atol=2e-5, rtol=0)
    torch.testing.assert_close(leaf.grad.double(), truth[0].grad, rtol=1e-4, atol=2e-5)
