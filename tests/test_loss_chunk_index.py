"""Per-token losses whose value depends on the token index, over several chunks, with and
without a mask, against float64 autograd over explicit logits.

A GRPO loss gathers per-token constants (advantages, old log-probs) by the ``index`` that
``linear_token_loss`` hands it; the chunk boundary is where that index can go wrong. Each
case below uses constants that differ at every position, chunk sizes that cut the tokens
into several (uneven) chunks, and masks that are absent, ragged (right-padded rows of
different lengths, as completions are) or left-padded (as prompts are). The per-token op
(``linear_logprobs_and_entropy``) gets the same treatment with an upstream gradient that
differs at every position, since its backward keeps one chunk of logits and recomputes the
others.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_helpers import DEVICE, IMPLS, INTERPRETER_WARNINGS

import saei_fast
from saei_fast.ops.linear_entropy.op import (
    _linear_logprobs_and_entropy_variant as linear_logprobs_and_entropy_impl,
)
from saei_fast.reference import linear_logprobs_and_entropy_reference

pytestmark = INTERPRETER_WARNINGS


def _inputs(rows, width, d, v, *, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (2 / math.sqrt(d))
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, (rows, width), generator=gen)
    hidden, weight, bias = (t.to(DEVICE, dtype) for t in (hidden, weight, bias))
    return hidden, weight, bias, labels.to(DEVICE)


def _mask(kind, rows, width, seed=0):
    """None, ragged (right padding: completions of different lengths, one of them full and
    one empty when there are rows enough), left (left padding: prompts of different
    lengths) or scattered (any pattern)."""
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, width + 1, (rows,), generator=gen)
    lengths[0] = width
    if rows > 2:
        lengths[1] = 0
    positions = torch.arange(width)
    if kind == "ragged":
        mask = positions < lengths[:, None]
    elif kind == "left":
        mask = positions >= width - lengths[:, None]
    else:
        mask = torch.rand(rows, width, generator=gen) > 0.4
        mask[0, -1] = True
    return mask.to(DEVICE)


class IndexedLoss:
    """``-w_i * (A_i * exp(logp - old_i) + c * H)`` with every constant different at every
    flat position ``i``: a token handed with the wrong index gets another token's
    constants, and the loss and gradients move. Records what each call was given."""

    def __init__(self, token_shape, seed=0, *, with_labels=True):
        gen = torch.Generator().manual_seed(seed + 11)
        n = math.prod(token_shape)
        self.advantages = (torch.randn(n, generator=gen, dtype=torch.float64) * 2).to(DEVICE)
        self.old_logprobs = (-torch.rand(n, generator=gen, dtype=torch.float64) * 4).to(DEVICE)
        self.weights = (torch.arange(n, dtype=torch.float64) / n + 0.5).to(DEVICE)
        self.entropy_coef = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.2).to(DEVICE)
        self.with_labels = with_labels
        self.calls: list[tuple] = []

    def __call__(self, logprobs, entropy, index):
        self.calls.append((index.clone(), entropy.detach().clone()))
        dtype = entropy.dtype
        term = self.entropy_coef[index].to(dtype) * entropy
        if self.with_labels:
            ratio = torch.exp(logprobs - self.old_logprobs[index].to(dtype))
            term = term + self.advantages[index].to(dtype) * ratio
        return -self.weights[index].to(dtype) * term

    def of(self, logprobs, entropy):
        """The same loss over every token at once, in the given (float64) values."""
        index = torch.arange(entropy.numel(), device=entropy.device)
        flat_lp = None if logprobs is None else logprobs.reshape(-1)
        saved, self.calls = self.calls, []
        out = self(flat_lp, entropy.reshape(-1), index)
        self.calls = saved
        return out


def _truth(hidden, weight, bias, labels, mask, loss_fn, temperature):
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    logprobs, entropy = linear_logprobs_and_entropy_reference(
        leaves[0], leaves[1], labels, bias=leaves[2], temperature=temperature
    )
    per_token = loss_fn.of(logprobs if loss_fn.with_labels else None, entropy)
    per_token = per_token.reshape(entropy.shape)
    if mask is not None:
        per_token = torch.where(mask, per_token, 0.0)
    loss = per_token.sum()
    return loss.detach(), torch.autograd.grad(loss, leaves), entropy.detach()


def _ours(hidden, weight, bias, labels, mask, loss_fn, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = saei_fast.linear_token_loss(
        leaves[0],
        leaves[1],
        labels if loss_fn.with_labels else None,
        loss_fn,
        bias=leaves[2],
        mask=mask,
        **kwargs,
    )
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def _check(hidden, weight, bias, labels, mask, loss_fn, *, temperature, tol, **kwargs):
    loss, grads = _ours(
        hidden, weight, bias, labels, mask, loss_fn, temperature=temperature, **kwargs
    )
    truth, truth_grads, entropy = _truth(hidden, weight, bias, labels, mask, loss_fn, temperature)
    torch.testing.assert_close(loss.double(), truth, rtol=tol, atol=tol)
    for name, ours, want in zip(("hidden", "weight", "bias"), grads, truth_grads, strict=True):
        torch.testing.assert_close(ours.double(), want, rtol=10 * tol, atol=tol, msg=name)
    # Every computed token handed over once, with its own position: the entropy the loss saw
    # at an index is that token's entropy.
    index = torch.cat([i for i, _ in loss_fn.calls])
    seen = torch.cat([h for _, h in loss_fn.calls]).double()
    wanted = torch.arange(entropy.numel(), device=DEVICE)
    if mask is not None:
        wanted = mask.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(index.sort().values, wanted)
    torch.testing.assert_close(seen, entropy.reshape(-1)[index], rtol=tol, atol=tol)
    return len(loss_fn.calls)


# 3 rows x 7 positions = 21 tokens, V = 37 (not a multiple of any vocab tile), D = 20 (not a
# multiple of the D tile). chunk_rows 5 cuts 21 tokens into 5,5,5,5,1 and the 13 ragged-mask
# tokens into 5,5,3; 1 puts every token in its own chunk; 21 is one chunk (the control).
ROWS, WIDTH, D, V = 3, 7, 20, 37


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", [None, "ragged", "left", "scattered"])
@pytest.mark.parametrize("chunk_rows", [1, 5, 21])
def test_index_dependent_loss_over_chunks_matches_float64(impl, mask_kind, chunk_rows):
    hidden, weight, bias, labels = _inputs(ROWS, WIDTH, D, V, seed=chunk_rows)
    mask = _mask(mask_kind, ROWS, WIDTH, seed=chunk_rows)
    loss_fn = IndexedLoss((ROWS, WIDTH), seed=chunk_rows)
    calls = _check(
        hidden, weight, bias, labels, mask, loss_fn, temperature=0.7, tol=2e-5,
        impl=impl, chunk_rows=chunk_rows,
    )  # fmt: skip
    n_tokens = ROWS * WIDTH if mask is None else int(mask.sum())
    assert calls == math.ceil(n_tokens / chunk_rows)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", [None, "ragged"])
def test_entropy_only_index_dependent_loss_over_chunks(impl, mask_kind):
    """No labels (an entropy bonus with per-token coefficients), several chunks."""
    hidden, weight, bias, labels = _inputs(ROWS, WIDTH, D, V, seed=5)
    mask = _mask(mask_kind, ROWS, WIDTH, seed=5)
    loss_fn = IndexedLoss((ROWS, WIDTH), seed=5, with_labels=False)
    _check(
        hidden, weight, bias, labels, mask, loss_fn, temperature=1.3, tol=2e-5,
        impl=impl, chunk_rows=4,
    )  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_of_one_token(impl):
    """One row of one token: one chunk of one row, whatever chunk_rows asks."""
    hidden, weight, bias, labels = _inputs(1, 1, D, V, seed=6)
    loss_fn = IndexedLoss((1, 1), seed=6)
    _check(
        hidden, weight, bias, labels, None, loss_fn, temperature=1.0, tol=2e-5,
        impl=impl, chunk_rows=3,
    )  # fmt: skip


@pytest.mark.parametrize(
    "impl,dtype",
    [
        ("torch", torch.float16),
        ("torch", torch.bfloat16),
        ("torch", torch.float64),
        # bfloat16 is refused under the interpreter; float64 always takes the PyTorch path.
        ("triton", torch.float16),
    ],
)
def test_index_dependent_loss_over_chunks_in_every_dtype(impl, dtype):
    """16-bit and float64 inputs, no mask, several chunks: the same indices and a value as
    close to float64 as the input precision allows."""
    hidden, weight, bias, labels = _inputs(ROWS, WIDTH, D, V, dtype=dtype, seed=7)
    loss_fn = IndexedLoss((ROWS, WIDTH), seed=7)
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-10}[dtype]
    _check(
        hidden, weight, bias, labels, None, loss_fn, temperature=0.9, tol=tol,
        impl=impl, chunk_rows=4,
    )  # fmt: skip


_mask_kinds = st.sampled_from([None, "ragged", "left", "scattered"])


def _property_case(impl, rows, width, chunk_rows, mask_kind, temperature, with_labels, seed):
    hidden, weight, bias, labels = _inputs(rows, width, 12, 29, seed=seed)
    mask = _mask(mask_kind, rows, width, seed=seed)
    loss_fn = IndexedLoss((rows, width), seed=seed, with_labels=with_labels)
    _check(
        hidden, weight, bias, labels, mask, loss_fn, temperature=temperature, tol=2e-5,
        impl=impl, chunk_rows=chunk_rows,
    )  # fmt: skip


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 4),
    width=st.integers(1, 9),
    chunk_rows=st.integers(1, 12),
    mask_kind=_mask_kinds,
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    with_labels=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_fused_loss_equals_unfused_for_any_chunking_and_mask(
    rows, width, chunk_rows, mask_kind, temperature, with_labels, seed
):
    """For any token layout, chunk size and mask: the fused per-token loss and its three
    gradients equal the unfused float64 computation (PyTorch path)."""
    _property_case("torch", rows, width, chunk_rows, mask_kind, temperature, with_labels, seed)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 3),
    width=st.integers(1, 6),
    chunk_rows=st.integers(2, 8),
    mask_kind=_mask_kinds,
    seed=st.integers(0, 2**16),
)
def test_property_triton_fused_loss_equals_unfused(rows, width, chunk_rows, mask_kind, seed):
    """The same property on the Triton kernels (few examples: the CPU interpreter is slow)."""
    _property_case("triton", rows, width, chunk_rows, mask_kind, 1.0, True, seed)


# ---- the per-token op ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl,fused", [("torch", True), ("triton", True), ("triton", False)],
    ids=["torch", "triton-fused", "triton-chunked"],
)  # fmt: skip
@pytest.mark.parametrize("mask_kind", [None, "ragged"])
def test_per_token_op_over_chunks_with_position_dependent_upstream(impl, fused, mask_kind):
    """``linear_logprobs_and_entropy`` over 5 chunks (its backward reuses one chunk's kept
    logits and recomputes the rest), with an upstream gradient different at every position,
    without and with a mask: values and gradients against float64."""
    hidden, weight, bias, labels = _inputs(ROWS, WIDTH, D, V, seed=9)
    mask = _mask(mask_kind, ROWS, WIDTH, seed=9)
    gen = torch.Generator().manual_seed(19)
    g_lp = torch.randn(ROWS, WIDTH, generator=gen, dtype=torch.float64).to(DEVICE)
    g_h = torch.randn(ROWS, WIDTH, generator=gen, dtype=torch.float64).to(DEVICE)
    _check_per_token(
        hidden, weight, bias, labels, mask, g_lp, g_h, temperature=0.8, impl=impl,
        fused=fused, chunk_rows=5,
    )  # fmt: skip


def _check_per_token(hidden, weight, bias, labels, mask, g_lp, g_h, *, temperature=1.0, **kwargs):
    """``linear_logprobs_and_entropy_impl(..., **kwargs)``: values, and gradients under the
    float64 upstream gradients ``g_lp`` / ``g_h`` (``[rows, width]``), against float64
    autograd over the full logits."""
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, ent = linear_logprobs_and_entropy_impl(
        leaves[0], leaves[1], labels, bias=leaves[2], temperature=temperature, mask=mask,
        **kwargs,
    )  # fmt: skip
    (g_lp.float() * logp + g_h.float() * ent).sum().backward()

    truth = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    true_lp, true_h = linear_logprobs_and_entropy_reference(
        truth[0], truth[1], labels, bias=truth[2], temperature=temperature, mask=mask
    )
    (g_lp * true_lp + g_h * true_h).sum().backward()
    torch.testing.assert_close(logp.double(), true_lp.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), true_h.detach(), rtol=1e-5, atol=2e-5)
    for name, ours, want in zip(("hidden", "weight", "bias"), leaves, truth, strict=True):
        torch.testing.assert_close(
            ours.grad.double(), want.grad, rtol=1e-4, atol=2e-5, msg=f"grad {name}"
        )


def _per_token_property_case(impl, fused, rows, width, chunk_rows, mask_kind, seed):
    hidden, weight, bias, labels = _inputs(rows, width, 12, 29, seed=seed)
    mask = _mask(mask_kind, rows, width, seed=seed)
    gen = torch.Generator().manual_seed(seed + 3)
    g_lp, g_h = torch.randn(2, rows, width, generator=gen, dtype=torch.float64).to(DEVICE)
    _check_per_token(
        hidden, weight, bias, labels, mask, g_lp, g_h, impl=impl, fused=fused,
        chunk_rows=chunk_rows,
    )  # fmt: skip


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 4),
    width=st.integers(1, 8),
    chunk_rows=st.integers(1, 10),
    mask_kind=_mask_kinds,
    seed=st.integers(0, 2**16),
)
def test_property_per_token_op_equals_unfused_for_any_chunking_and_mask(
    rows, width, chunk_rows, mask_kind, seed
):
    """For any layout, chunk size and mask: the per-token op's values, and its gradients
    under an upstream gradient different at every position, equal float64 autograd over the
    full logits (PyTorch path)."""
    _per_token_property_case("torch", True, rows, width, chunk_rows, mask_kind, seed)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 3),
    width=st.integers(2, 6),
    chunk_rows=st.integers(1, 5),
    mask_kind=_mask_kinds,
    seed=st.integers(0, 2**16),
)
def test_property_triton_per_token_op_equals_unfused(rows, width, chunk_rows, mask_kind, seed):
    """The same on the fused Triton kernels, whose backward reuses the one chunk of logits
    kept by the forward and recomputes the others (few examples: the interpreter is slow)."""
    _per_token_property_case("triton", True, rows, width, chunk_rows, mask_kind, seed)
