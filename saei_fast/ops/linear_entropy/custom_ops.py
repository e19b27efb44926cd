"""The linear-entropy op on flat tensors: the torch.library custom ops (forward, backward,
and the frozen-head forward-with-gradient), so ``torch.compile`` sees opaque nodes with a
registered backward, their autograd, and the computations they run, which the
vocabulary-parallel op (``vocab_parallel``) shares: plain tensors in, the path chosen by
``impl`` (``"triton"``: the fused kernels of ``triton_path``; ``"torch"`` or
``"triton_chunked"``: chunks of materialised logits in ``torch_path``). ``impl`` arrives
resolved (``dispatch.op_impl``: float64 already sent to ``"torch"``).

Masked tokens are skipped entirely (their rows are never multiplied), so prompt and image
tokens cost nothing. In the backward, a row whose upstream gradients are all 0 is treated as
masked too: it contributes exactly 0 to every gradient, even when its hidden state is not
finite (a NaN row excluded from the loss with ``torch.where`` leaves the weight gradient
finite). Everything is computed from fp32 accumulators on logits rounded to the input dtype
after the GEMM, as ``F.linear`` returns them.
"""

from __future__ import annotations

import torch

from saei_fast.ops.entropy import torch_path as entropy_torch
from saei_fast.ops.linear_entropy import torch_path, triton_path
from saei_fast.ops.linear_entropy.chunks import chunk_rows_for, chunks, live_mask, selected_rows

# -------------------------------------------------------------------------------------------
# The computations: plain tensors, no autograd
# -------------------------------------------------------------------------------------------


def linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
    keep: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(entropy [N], logprobs [N] or None, stats [N, 2], kept or None)`` per row of
    ``hidden [N, D]`` in the accumulation dtype, ``stats = (max logit, log sum exp((x - max)
    / T))`` as in the entropy op. Masked rows give 0. A label outside ``[0, V)`` gives a
    NaN log-prob (the vocabulary-parallel op marks labels owned by another rank that way).
    ``keep`` > 0 (fused path) keeps the logits of the first ``keep`` computed rows in
    ``kept [keep, V]`` for :func:`linear_backward`."""
    rows = selected_rows(mask)
    if impl == "triton":
        return triton_path.forward(hidden, weight, bias, labels, rows, inv_temperature, keep)
    chunk_rows = chunk_rows_for(impl, weight.shape[0], hidden, chunk_rows)
    entropy, logprobs, stats = torch_path.forward(
        hidden, weight, bias, labels, rows, inv_temperature, impl, chunk_rows
    )
    return entropy, logprobs, stats, None


def linear_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
    weight_grad: bool,
    bias_grad: bool,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(g_H * H + g_logp * logp)`` w.r.t. ``hidden`` (always), ``weight``
    and ``bias`` (None unless asked for).

    ``kept`` (fused path) holds the logits of the first ``kept.shape[0]`` rows the forward
    computed; their gradient is written over them (no recompute). Every other live row's
    logits are recomputed chunk by chunk. ``entropy`` / ``stats`` are the statistics the
    gradient is taken at (the vocabulary-parallel op passes the global ones with a shard of
    the weight). A 16-bit ``grad_weight`` is accumulated over chunks in its own dtype (each
    chunk's GEMM adds in fp32 and rounds once). One function, longer than most, because the
    kept rows and the recomputed rows share the gradient buffers and the ``accumulate`` step.
    """
    N, V = hidden.shape[0], weight.shape[0]
    acc = entropy_torch.accumulation_dtype(hidden.dtype)
    if grad_logprobs is None:
        labels = None
    # Per-row tensors are read with unit stride; autograd hands over expanded gradients.
    grad_entropy = grad_entropy.to(acc).contiguous()
    if grad_logprobs is not None:
        grad_logprobs = grad_logprobs.to(acc).contiguous()
    entropy, stats = entropy.contiguous(), stats.contiguous()
    live = live_mask(mask, grad_entropy, grad_logprobs)

    grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_weight = None
    if weight_grad:
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    grad_bias = torch.zeros(V, dtype=acc, device=hidden.device) if bias_grad else None

    def accumulate(index, grad_logits, hidden_chunk):
        grad_hidden[index] = torch.mm(grad_logits, weight)
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), hidden_chunk)
        if grad_bias is not None:
            grad_bias.add_(grad_logits.sum(0, dtype=acc))

    forward_rows = selected_rows(mask)
    n_forward = N if forward_rows is None else forward_rows.numel()
    n_kept = 0 if kept is None else min(kept.shape[0], n_forward)
    if n_kept:
        index = slice(0, n_kept) if forward_rows is None else forward_rows[:n_kept]
        buffer = kept[:n_kept]
        # Rows without upstream gradient come out as exact zeros of the gradient pass;
        # their hidden rows are zeroed too, so that 0 * NaN cannot reach grad_weight.
        triton_path.grad_logits(
            hidden, weight, bias, forward_rows, 0, labels, entropy, stats, grad_entropy,
            grad_logprobs, inv_temperature, buffer, True,
        )  # fmt: skip
        hidden_chunk = hidden[index]
        if grad_weight is not None:
            hidden_chunk = torch.where(live[index].unsqueeze(1), hidden_chunk, 0.0)
        accumulate(index, buffer, hidden_chunk)

    # The remaining live rows, recomputed chunk by chunk.
    if forward_rows is None:
        rest = torch.arange(n_kept, N, device=hidden.device)
    else:
        rest = forward_rows[n_kept:]
    rest = rest[live[rest]]
    if rest.numel() == 0:
        return grad_hidden, grad_weight, _bias_dtype(grad_bias, bias)
    chunk_rows = chunk_rows_for(impl, V, hidden, chunk_rows)
    buffer = None
    if impl == "triton":
        size = min(chunk_rows, rest.numel())
        buffer = kept[:size] if kept is not None and kept.shape[0] >= size else None
        if buffer is None:
            buffer = torch.empty(size, V, dtype=weight.dtype, device=weight.device)
    for start, index in chunks(rest.numel(), rest, chunk_rows):
        if impl == "triton":
            grad_logits = triton_path.grad_logits(
                hidden, weight, bias, rest, start, labels, entropy, stats, grad_entropy,
                grad_logprobs, inv_temperature, buffer[: index.numel()], False,
            )  # fmt: skip
        else:
            grad_logits = torch_path.grad_logits_chunk(
                impl, hidden, weight, bias, index, labels, entropy, stats, grad_entropy,
                grad_logprobs, inv_temperature,
            )  # fmt: skip
        accumulate(index, grad_logits, hidden[index])
        # Drop the chunk's gradient before the next chunk allocates its own: two [c, V]
        # buffers alive at once, never three.
        del grad_logits
    return grad_hidden, grad_weight, _bias_dtype(grad_bias, bias)


def _bias_dtype(grad_bias: torch.Tensor | None, bias: torch.Tensor | None):
    return None if grad_bias is None else grad_bias.to(bias.dtype)


def linear_entropy_with_input_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropy [N], dH/dhidden [N, D])`` for a frozen lm_head, in one pass over the chunks.

    ``H_n`` depends on ``hidden[n]`` only, so its gradient is a per-row vector and the
    backward of ``sum(g_H * H)`` is ``g_H[:, None] * dH/dhidden``: no recompute, two GEMMs in
    all where recomputing in the backward needs three. The result is in the hidden dtype;
    masked rows give 0.
    """
    rows = selected_rows(mask)
    V = weight.shape[0]
    if impl == "triton":
        chunk_rows = chunk_rows_for(impl, V, hidden, chunk_rows)
        return triton_path.entropy_with_input_grad(
            hidden, weight, bias, rows, inv_temperature, chunk_rows
        )
    chunk_rows = chunk_rows_for(impl, V, hidden, chunk_rows, acc_buffers=2)
    return torch_path.entropy_with_input_grad(
        hidden, weight, bias, rows, inv_temperature, impl, chunk_rows
    )


# -------------------------------------------------------------------------------------------
# Custom ops: forward and backward, so torch.compile sees opaque nodes
# -------------------------------------------------------------------------------------------


@torch.library.custom_op("saei_fast::linear_entropy", mutates_args=())
def linear_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    entropy, logprobs, stats, kept = linear_forward(
        hidden,
        weight,
        bias,
        labels,
        mask,
        inv_temperature,
        impl,
        chunk_rows,
        keep if impl == "triton" else 0,
    )
    # Custom ops cannot return None: empty tensors stand for "none".
    if logprobs is None:
        logprobs = entropy.new_empty(0)
    if kept is None:
        kept = hidden.new_empty(0)
    return entropy, logprobs, stats, kept


@linear_entropy_op.register_fake
def _(hidden, weight, bias, labels, mask, inv_temperature, impl, chunk_rows, keep):
    n = hidden.shape[0]
    acc = entropy_torch.accumulation_dtype(hidden.dtype)
    entropy = hidden.new_empty(n, dtype=acc)
    logprobs = entropy.new_empty(n if labels is not None else 0)
    keeps = keep and impl == "triton"
    kept = hidden.new_empty(keep, weight.shape[0]) if keeps else hidden.new_empty(0)
    return entropy, logprobs, entropy.new_empty(n, 2), kept


@torch.library.custom_op("saei_fast::linear_entropy_backward", mutates_args=("kept",))
def linear_entropy_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    kept: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_hidden, grad_weight, grad_bias = linear_backward(
        hidden,
        weight,
        bias,
        labels,
        mask,
        entropy,
        stats,
        grad_entropy,
        grad_logprobs,
        inv_temperature,
        impl,
        chunk_rows,
        weight_grad,
        bias_grad,
        kept,
    )
    # Custom ops cannot return None (nor one tensor twice): an empty tensor stands for
    # "not requested".
    return (
        grad_hidden,
        hidden.new_empty(0) if grad_weight is None else grad_weight,
        hidden.new_empty(0) if grad_bias is None else grad_bias,
    )


@linear_entropy_backward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    mask,
    entropy,
    stats,
    grad_entropy,
    grad_logprobs,
    kept,
    inv_temperature,
    impl,
    chunk_rows,
    weight_grad,
    bias_grad,
):
    grad_weight = torch.empty_like(weight) if weight_grad else hidden.new_empty(0)
    grad_bias = torch.empty_like(bias) if bias_grad else hidden.new_empty(0)
    return torch.empty_like(hidden), grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, mask, inv_temperature, impl, chunk_rows, _ = inputs
    entropy, _, stats, kept = output
    ctx.save_for_backward(hidden, weight, bias, labels, mask, entropy, stats)
    # The kept logits are consumed (overwritten by their gradient) by the first backward, so
    # they are held outside the saved tensors: a second backward through the same graph
    # (retain_graph=True) finds None and recomputes. Detached: no reference cycle through
    # the output's grad_fn.
    ctx.kept = kept.detach() if kept.numel() else None
    ctx.inv_temperature = inv_temperature
    ctx.impl = impl
    ctx.chunk_rows = chunk_rows
    ctx.has_labels = labels is not None


def _backward(ctx, grad_entropy, grad_logprobs, _grad_stats, _grad_kept):
    hidden, weight, bias, labels, mask, entropy, stats = ctx.saved_tensors
    kept, ctx.kept = ctx.kept, None
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(entropy)
    if not ctx.has_labels:
        grad_logprobs = None
    weight_grad = ctx.needs_input_grad[1]
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    grad_hidden, grad_weight, grad_bias = linear_entropy_backward_op(
        hidden,
        weight,
        bias,
        labels,
        mask,
        entropy,
        stats,
        grad_entropy,
        grad_logprobs,
        kept,
        ctx.inv_temperature,
        ctx.impl,
        ctx.chunk_rows,
        weight_grad,
        bias_grad,
    )
    return (
        grad_hidden,
        grad_weight if weight_grad else None,
        grad_bias if bias_grad else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


linear_entropy_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("saei_fast::linear_entropy_with_input_grad", mutates_args=())
def linear_entropy_input_grad_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_entropy_with_input_grad(
        hidden, weight, bias, mask, inv_temperature, impl, chunk_rows
    )


@linear_entropy_input_grad_op.register_fake
def _(hidden, weight, bias, mask, inv_temperature, impl, chunk_rows):
    acc = entropy_torch.accumulation_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=acc), torch.empty_like(hidden)


def _setup_input_grad_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[3])


def _input_grad_backward(ctx, grad_entropy, _grad_input_grad):
    input_grad, mask = ctx.saved_tensors
    grad_hidden = None
    if grad_entropy is not None:
        # Masked rows and rows without upstream gradient get exactly 0, whatever the
        # upstream gradient (NaN at a masked row) or the row's dH/dhidden (a NaN hidden row
        # excluded from the loss) holds.
        live = grad_entropy != 0
        if mask is not None:
            live = live & mask
        scaled = grad_entropy.unsqueeze(1) * input_grad
        grad_hidden = torch.where(live.unsqueeze(1), scaled, 0.0).to(input_grad.dtype)
    return grad_hidden, None, None, None, None, None, None


linear_entropy_input_grad_op.register_autograd(
    _input_grad_backward, setup_context=_setup_input_grad_context
)
