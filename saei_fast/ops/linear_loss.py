"""A per-token loss of the label log-probs and entropies from hidden states + lm_head, with
its gradients taken during the forward: the training head at 3 GEMMs per token, whatever
the number of tokens, without building ``[N, V]`` logits.

``linear_logprobs_and_entropy`` returns per-token values whose upstream gradient is known
only in the backward, so it keeps one chunk of logits for the backward and recomputes the
others (up to 4 GEMMs per token). A policy-gradient loss (GRPO, DAPO, Dr. GRPO, with a KL
or entropy term) is a sum of per-token terms, each a function of that token's log-prob and
entropy and of per-token constants (advantages, old / reference log-probs, weights):
given that function, each chunk's gradient is formed while its logits are in memory
(``_token_loss_paths``). The backward scales the stored gradients by the loss's upstream
gradient. Extra memory: one ``[c, V]`` chunk, plus the gradients themselves
(``[N, D]``, and ``[V, D]`` when the lm_head is trained) held from forward to backward.
"""

from __future__ import annotations

import torch

from saei_fast.ops._token_loss_paths import TokenLoss, token_loss_and_grads
from saei_fast.ops.dispatch import resolve_impl
from saei_fast.ops.linear_entropy import (
    _check_chunk_rows,
    _check_interpreter_dtype,
    _check_linear,
    _op_impl,
)
from saei_fast.validation import check_labels, check_mask, check_temperature, check_tensor


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
    """
    hidden, weight, bias = _check_linear(hidden, weight, bias)
    if not callable(token_loss):
        raise TypeError(f"token_loss must be callable, got {type(token_loss).__name__}")
    temperature = check_temperature(temperature)
    chunk_rows = _check_chunk_rows(chunk_rows)
    token_shape = hidden.shape[:-1]
    mask = check_mask(mask, token_shape, hidden, "hidden")
    if labels is not None:
        labels = check_tensor("labels", labels)
        labels = check_labels(labels, token_shape, weight.shape[0], mask, hidden, "hidden")
    op_impl = resolve_impl(impl, hidden.device)
    _check_interpreter_dtype(op_impl, hidden)
    op_impl = _op_impl(op_impl, hidden)

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
        op_impl,
        chunk_rows,
        torch.is_grad_enabled(),
    )


__all__ = ["linear_token_loss"]
