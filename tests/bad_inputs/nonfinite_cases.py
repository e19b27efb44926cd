"""Catalogue: the backward of non-finite and masked rows (both paths).

The documented behaviour: a position whose upstream gradients are all zero is treated as
masked in the backward, so it contributes exactly 0 to every gradient (logits, hidden,
weight, bias), even when its inputs are not finite; a masked position contributes exactly
0 whatever its upstream gradient holds (NaN included). Each entry returns the gradients and
compares them with float64 autograd through the reference on the same inputs, where the
excluded rows are replaced by finite values (they must not matter) and the loss leaves
them out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bad_inputs.core import Returns, randn, table
from saei_fast import (
    entropy,
    linear_entropy,
    linear_logprobs_and_entropy,
    logprobs_and_entropy,
)
from saei_fast.reference import (
    entropy_reference,
    linear_entropy_reference,
    linear_logprobs_and_entropy_reference,
    logprobs_and_entropy_reference,
)

N, V, D = 3, 7, 5
KEEP = torch.tensor([True, False, True])  # row 1 is the bad one
GRADIENT = {"dtype": torch.float32, "atol": 2e-5, "rtol": 1e-4}  # as in test_entropy.py


def _logits(bad: float | None) -> torch.Tensor:
    logits = randn(N, V, seed=31)
    if bad is not None:
        logits[1] = bad
    return logits


@dataclass(frozen=True)
class Loss:
    """A loss over the per-row values, as applied to the op's output (``op``) and to the
    reference's (``reference``: the same on the kept rows, 0 gradient elsewhere)."""

    op: Callable[[torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]


def _sum_kept(values: torch.Tensor) -> torch.Tensor:
    return torch.where(KEEP, values, 0.0).sum()


# Row 1 left out with torch.where: its upstream gradient is 0.
LEFT_OUT = Loss(_sum_kept, _sum_kept)
# The upstream gradient is NaN exactly at the masked row 1: d sqrt(x) at x = 0 is inf, times
# the mask's 0. (The reference takes the square root of the kept rows only.)
NAN_AT_MASKED = Loss(
    lambda values: (values.sqrt() * KEEP).sum(),
    lambda values: _sum_kept(torch.where(KEEP, values, 1.0).sqrt()),
)


def _logits_case(bad: float | None, loss: Loss, *, labels: bool = False, mask: bool = False):
    def call(impl):
        leaf = _logits(bad).requires_grad_(True)
        kwargs = {"mask": KEEP} if mask else {}
        if labels:
            logp, ent = logprobs_and_entropy(leaf, torch.arange(N), impl=impl, **kwargs)
            loss.op(ent - logp).backward()
        else:
            loss.op(entropy(leaf, impl=impl, **kwargs)).backward()
        return leaf.grad

    def expected():
        leaf = _logits(0.0).double().requires_grad_(True)
        if labels:
            logp, ent = logprobs_and_entropy_reference(leaf, torch.arange(N))
            loss.reference(ent - logp).backward()
        else:
            loss.reference(entropy_reference(leaf)).backward()
        return leaf.grad

    return call, Returns(expected, **GRADIENT)


def _hidden(bad: float | None) -> torch.Tensor:
    hidden = randn(N, D, seed=32)
    if bad is not None:
        hidden[1] = bad
    return hidden


def _linear_case(
    bad: float | None, loss: Loss, *, head: str, labels: bool = False, mask: bool = False
):
    """``head``: "frozen" (weight without grad: the attack's fast path), "trainable" or
    "trainable+bias"."""

    def leaves(hidden, double):
        weight = randn(V, D, seed=33)
        bias = randn(V, seed=34) if head == "trainable+bias" else None
        if double:
            weight = weight.double()
            bias = None if bias is None else bias.double()
        weight.requires_grad_(head != "frozen")
        if bias is not None:
            bias.requires_grad_(True)
        return hidden.requires_grad_(True), weight, bias

    def gradients(hidden, weight, bias):
        grads = [hidden.grad]
        if head != "frozen":
            grads.append(weight.grad)
        if bias is not None:
            grads.append(bias.grad)
        return tuple(grads)

    def call(impl):
        hidden, weight, bias = leaves(_hidden(bad), double=False)
        kwargs = {"mask": KEEP} if mask else {}
        if labels:
            logp, ent = linear_logprobs_and_entropy(
                hidden, weight, torch.arange(N), bias=bias, impl=impl, **kwargs
            )
            loss.op(ent - logp).backward()
        else:
            loss.op(linear_entropy(hidden, weight, bias=bias, impl=impl, **kwargs)).backward()
        return gradients(hidden, weight, bias)

    def expected():
        hidden, weight, bias = leaves(_hidden(0.0).double(), double=True)
        if labels:
            logp, ent = linear_logprobs_and_entropy_reference(
                hidden, weight, torch.arange(N), bias=bias
            )
            loss.reference(ent - logp).backward()
        else:
            loss.reference(linear_entropy_reference(hidden, weight, bias=bias)).backward()
        return gradients(hidden, weight, bias)

    return call, Returns(expected, **GRADIENT)


ENTRY = {
    # ---- from logits ---------------------------------------------------------------------
    "backward/entropy-all--inf-row-left-out": _logits_case(-math.inf, LEFT_OUT),
    "backward/entropy-nan-row-left-out": _logits_case(math.nan, LEFT_OUT),
    "backward/entropy-inf-row-left-out": _logits_case(math.inf, LEFT_OUT),
    "backward/entropy-nan-row-masked": _logits_case(math.nan, LEFT_OUT, mask=True),
    "backward/entropy-nan-upstream-at-masked-row": _logits_case(None, NAN_AT_MASKED, mask=True),
    "backward/logprobs-all--inf-row-left-out": _logits_case(-math.inf, LEFT_OUT, labels=True),
    "backward/logprobs-nan-upstream-at-masked-row": _logits_case(
        None, NAN_AT_MASKED, labels=True, mask=True
    ),
    # ---- from hidden states --------------------------------------------------------------
    "backward/linear-frozen-nan-upstream-at-masked-row": _linear_case(
        None, NAN_AT_MASKED, head="frozen", mask=True
    ),
    "backward/linear-trainable-nan-upstream-at-masked-row": _linear_case(
        None, NAN_AT_MASKED, head="trainable", mask=True
    ),
    "backward/linear-frozen-nan-row-left-out": _linear_case(math.nan, LEFT_OUT, head="frozen"),
    "backward/linear-trainable-nan-row-left-out": _linear_case(
        math.nan, LEFT_OUT, head="trainable"
    ),
    "backward/linear-bias-inf-row-left-out": _linear_case(
        math.inf, LEFT_OUT, head="trainable+bias"
    ),
    "backward/linear-trainable-nan-row-masked": _linear_case(
        math.nan, LEFT_OUT, head="trainable", mask=True
    ),
    "backward/linear-logprobs-nan-row-left-out": _linear_case(
        math.nan, LEFT_OUT, head="trainable+bias", labels=True
    ),
}

CASES = table(ENTRY)
