"""The loss head's public function, :func:`linear_token_loss`: a per-token loss of the label
log-probs and entropies from hidden states + lm_head, with its gradients taken during the
forward (the training head at 3 GEMMs per token, whatever the number of tokens, without
building ``[N, V]`` logits); its autograd, and the chunk loop that computes loss and
gradients, each chunk on the path ``impl`` chose (``torch_path`` / ``triton_path``).

``linear_logprobs_and_entropy`` returns per-token values whose upstream gradient is known
only in the backward, so it keeps one chunk of logits for the backward and recomputes the
others (up to 4 GEMMs per token). A policy-gradient loss (GRPO, DAPO, Dr. GRPO, with a KL
or entropy term) is a sum of per-token terms, each a function of that token's log-prob and
entropy and of per-token constants (advantages, old / reference log-probs, weights), so
each token's upstream gradient ``(dL/dlogp, dL/dH)`` is known as soon as its log-prob and
entropy are, and the gradient w.r.t. a chunk's logits is formed while they are in memory:

    per chunk of rows:  logits (GEMM 1, kept)  ->  logp, H  ->  token_loss  ->  dL/dlogp, dL/dH
                        ->  dL/dlogits over the kept logits  ->  grad_hidden = g @ W (GEMM 2)
                        ->  grad_weight += g.T @ hidden (GEMM 3)

The backward scales the stored gradients by the loss's upstream gradient (a scalar). Extra
memory: one ``[c, V]`` chunk, plus the gradients themselves (``[N, D]``, and ``[V, D]`` when
the lm_head is trained) held from forward to backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saei_fast.kernels.plan import even_chunk_rows
from saei_fast.ops.dispatch import op_impl
from saei_fast.ops.entropy import torch_path as entropy_torch
from saei_fast.ops.linear_entropy.chunks import chunk_rows_for, chunks
from saei_fast.ops.linear_entropy.op import (
    check_chunk_rows,
    check_interpreter_dtype,
    check_linear,
)
from saei_fast.ops.linear_loss import torch_path, triton_path
from saei_fast.validation import check_labels, check_mask, check_temperature, check_tensor

TokenLoss = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor]

# -------------------------------------------------------------------------------------------
# Loss and gradients, chunk by chunk: plain tensors, no autograd
# -------------------------------------------------------------------------------------------


def _upstream(token_loss: TokenLoss, logprobs, entropy, positions, want_grad: bool):
    """``(sum of the chunk's token losses, dL/dlogp or None, dL/dH)``: the user's loss on
    detached leaves, differentiated with autograd (a few ``[c]`` tensors)."""
    with torch.enable_grad():
        entropy = entropy.detach().requires_grad_(want_grad)
        if logprobs is not None:
            logprobs = logprobs.detach().requires_grad_(want_grad)
        losses = token_loss(logprobs, entropy, positions)
        _check_losses(losses, entropy.shape[0])
        total = losses.sum(dtype=torch.float64)
        if not (want_grad and total.requires_grad):
            zeros = torch.zeros_like(entropy)
            return total.detach(), None if logprobs is None else zeros, zeros
        leaves = [entropy] if logprobs is None else [logprobs, entropy]
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    pairs = zip(leaves, grads, strict=True)
    grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in pairs]
    g_lp = None if logprobs is None else grads[0].detach()
    return total.detach(), g_lp, grads[-1].detach()


def _check_losses(losses: object, n_tokens: int) -> None:
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"token_loss must return a Tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise TypeError(f"token_loss must return a float tensor, got {losses.dtype}")
    if tuple(losses.shape) not in ((), (n_tokens,)):
        raise ValueError(
            f"token_loss must return one loss per token ([{n_tokens}]) or their sum ([]), "
            f"got shape {tuple(losses.shape)}"
        )


def _chunk_stats_and_logits(impl, part, weight, bias, labels, inv_t, keep: bool, buffer):
    """``(entropy, logprobs or None, stats, logits or None)`` of one chunk of rows ``part``
    (contiguous ``[c, D]``); ``logits`` (kept for the gradient) only when ``keep``."""
    if impl == "triton":
        logits = buffer[: part.shape[0]] if keep else None
        return triton_path.chunk_stats_and_logits(part, weight, bias, labels, inv_t, logits)
    return torch_path.chunk_stats_and_logits(impl, part, weight, bias, labels, inv_t, keep)


def _chunk_grad_logits(impl, part, weight, bias, logits, labels, h, stats, g_h, g_lp, inv_t):
    """``dL/dlogits`` of the chunk, written over its kept ``logits`` where the path can."""
    if impl == "triton":
        return triton_path.chunk_grad_logits(
            part, weight, bias, logits, labels, h, stats, g_h, g_lp, inv_t
        )
    return torch_path.chunk_grad_logits(impl, logits, labels, h, stats, g_h, g_lp, inv_t)


def token_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    rows: torch.Tensor | None,
    token_loss: TokenLoss,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
    grads: tuple[bool, bool, bool],
):
    """``(loss, grad_hidden, grad_weight, grad_bias)``: the sum of ``token_loss`` over the
    rows ``rows`` of ``hidden [N, D]`` (None: all), in float64, and its gradients (None where
    ``grads = (hidden, weight, bias)`` does not ask). Rows not computed get 0 gradient; a
    16-bit ``grad_weight`` is accumulated over chunks in its own dtype, as in the per-token
    op's backward."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = entropy_torch.accumulation_dtype(hidden.dtype)
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    hidden_grad, weight_grad, bias_grad = grads
    want_grad = any(grads)
    # Every row is written when every row is computed; skipped rows must read 0.
    make = torch.empty_like if rows is None else torch.zeros_like
    grad_hidden = make(hidden) if hidden_grad else None
    grad_weight = None
    if weight_grad:  # a frozen lm_head gets no [V, D] buffer at all
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    grad_bias = torch.zeros(V, dtype=acc, device=hidden.device) if bias_grad else None
    n_rows = N if rows is None else rows.numel()
    if n_rows == 0:
        return loss, grad_hidden, grad_weight, _cast(grad_bias, bias)
    chunk_rows = even_chunk_rows(n_rows, chunk_rows_for(impl, V, hidden, chunk_rows))
    buffer = None
    if impl == "triton" and want_grad:
        buffer = torch.empty(chunk_rows, V, dtype=hidden.dtype, device=hidden.device)
    for start, index in chunks(n_rows, rows, chunk_rows):
        # One contiguous [c, D] block per chunk (a view when every row is computed): the
        # kernels and the GEMMs index it from 0.
        part = hidden[index].contiguous()
        positions = (
            index
            if rows is not None
            else torch.arange(start, start + part.shape[0], device=hidden.device)
        )
        chunk_labels = None if labels is None else labels[index].contiguous()
        h, lp, stats, logits = _chunk_stats_and_logits(
            impl, part, weight, bias, chunk_labels, inv_temperature, want_grad, buffer
        )
        total, g_lp, g_h = _upstream(token_loss, lp, h, positions, want_grad)
        loss += total
        if not want_grad:
            continue
        g = _chunk_grad_logits(
            impl, part, weight, bias, logits, chunk_labels, h, stats, g_h.to(acc).contiguous(),
            None if g_lp is None else g_lp.to(acc).contiguous(), inv_temperature,
        )  # fmt: skip
        del logits
        if grad_hidden is not None:
            grad_hidden[index] = torch.mm(g, weight)
        if grad_weight is not None:
            # A row without upstream gradient has an exact-0 gradient row; its hidden row is
            # zeroed too, so that 0 * NaN (a non-finite row left out of the loss) stays 0.
            live = g_h != 0
            if g_lp is not None:
                live |= g_lp != 0
            grad_weight.addmm_(g.t(), torch.where(live.unsqueeze(1), part, 0.0))
        if grad_bias is not None:
            grad_bias.add_(g.sum(0, dtype=acc))
        del g
    return loss, grad_hidden, grad_weight, _cast(grad_bias, bias)


def _cast(grad_bias: torch.Tensor | None, bias: torch.Tensor | None):
    return None if grad_bias is None else grad_bias.to(bias.dtype)


# -------------------------------------------------------------------------------------------
# Autograd and the public function
# -------------------------------------------------------------------------------------------


class _LinearTokenLoss(torch.autograd.Function):
    """Loss in the forward, gradients too; the backward only scales them."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, rows, token_loss, inv_t, impl, chunk_rows, recording
    ):
        # needs_input_grad follows requires_grad alone; under no_grad no backward can follow.
        grads = (
            recording and ctx.needs_input_grad[0],
            recording and ctx.needs_input_grad[1],
            recording and bias is not None and ctx.needs_input_grad[2],
        )
        loss, grad_hidden, grad_weight, grad_bias = token_loss_and_grads(
            hidden, weight, bias, labels, rows, token_loss, inv_t, impl, chunk_rows, grads
        )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors

        def scaled(grad):
            # A 0-dim fp32 factor keeps a 16-bit gradient in its dtype.
            return None if grad is None else grad * grad_loss

        return scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias), *[None] * 7


@torch.compiler.disable
def linear_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    token_loss: TokenLoss,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    impl: str | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``sum over tokens of token_loss(log p(label), H, index)`` for
    ``softmax((hidden @ weight.T + bias) / temperature)``, with its gradients computed in
    the forward (3 GEMMs per token; no ``[N, V]`` logits).

    Args:
        hidden: ``[..., D]`` float16 / bfloat16 / float32 / float64 (leading dims may be
            non-contiguous).
        weight: ``[V, D]`` lm_head weight, same dtype and device as ``hidden``.
        labels: int32/int64 ``[...]`` in ``[0, V)`` wherever ``mask`` is True, or None
            (``token_loss`` then gets ``logprobs=None``).
        token_loss: ``token_loss(logprobs, entropy, index) -> Tensor``, called once per chunk
            of tokens with the chunk's float32 (float64 for float64 inputs) ``logprobs [c]``
            (or None) and ``entropy [c]`` and ``index [c]``, the int64 positions of those
            tokens in the flattened token dims (``hidden.shape[:-1]``, row-major), to gather
            per-token constants with (``advantages.reshape(-1)[index]``). It returns the
            chunk's per-token losses ``[c]`` or their sum ``[]``. It must be differentiable
            in ``logprobs`` / ``entropy`` with autograd, and it must be per-token: token
            ``i``'s term may depend on ``logprobs[i]``, ``entropy[i]`` and constants only,
            never on other tokens' values (sequence-level ratios, batch quantiles); for those,
            use :func:`saei_fast.linear_logprobs_and_entropy` and compute the loss outside.
            Tensors it captures are constants: no gradient flows into them.
        bias: optional ``[V]``, same dtype as ``weight``.
        temperature: sampling temperature, a Python float > 0.
        mask: optional bool ``[...]``; False positions are never computed nor passed to
            ``token_loss`` (they add nothing to the loss and get 0 gradient).
        impl: ``"triton"``, ``"torch"`` or None (``SAEI_IMPL`` or automatic by device).
        chunk_rows: tokens per chunk (default: the path's memory budget).

    Returns:
        The loss, a 0-dim float32 tensor (float64 for float64 inputs), differentiable w.r.t.
        ``hidden`` and, when they require grad, ``weight`` and ``bias``. The gradients are
        computed whenever one of them requires grad and grad mode is on, and held until the
        backward; a second backward (``retain_graph=True``) reuses them. Eager only: under
        ``torch.compile`` this call runs outside the compiled graph.

    Raises:
        TypeError: non-tensor or non-float inputs, mismatched dtypes, ``token_loss`` not
            callable, or returning a non-tensor / non-float tensor.
        ValueError: shape or device mismatch, empty dims, ``temperature <= 0``, labels out
            of range, ``token_loss`` returning a wrong shape.

    (Over 80 lines only through this docstring: the body is checks and one ``apply``.)
    """
    hidden, weight, bias = check_linear(hidden, weight, bias)
    if not callable(token_loss):
        raise TypeError(f"token_loss must be callable, got {type(token_loss).__name__}")
    temperature = check_temperature(temperature)
    chunk_rows = check_chunk_rows(chunk_rows)
    token_shape = hidden.shape[:-1]
    mask = check_mask(mask, token_shape, hidden, "hidden")
    if labels is not None:
        labels = check_tensor("labels", labels)
        labels = check_labels(labels, token_shape, weight.shape[0], mask, hidden, "hidden")
    # The one dispatch rule (float64 runs on the PyTorch path).
    impl = op_impl(impl, hidden)
    check_interpreter_dtype(impl, hidden)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    # One host sync on CUDA (the count is data-dependent); masked tokens cost nothing.
    rows = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
    return _LinearTokenLoss.apply(
        flat_hidden,
        weight,
        bias,
        flat_labels,
        rows,
        token_loss,
        1.0 / temperature,
        impl,
        chunk_rows,
        torch.is_grad_enabled(),
    )


__all__ = ["linear_token_loss"]
