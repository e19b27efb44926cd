"""The linear-entropy computations behind the custom ops and the vocabulary-parallel op:
forward, backward and the frozen-head forward-with-gradient, each dispatching to the fused
Triton kernels (``_linear_fused``) or to chunks of materialised logits (``_linear_torch``:
the PyTorch path and the chunked Triton variant). Plain tensors, no autograd.

Masked tokens are skipped entirely (their rows are never multiplied), so prompt and image
tokens cost nothing. In the backward, a row whose upstream gradients are all 0 is treated as
masked too: it contributes exactly 0 to every gradient, even when its hidden state is not
finite (a NaN row excluded from the loss with ``torch.where`` leaves the weight gradient
finite). Everything is computed from fp32 accumulators on logits rounded to the input dtype
after the GEMM, as ``F.linear`` returns them.
"""

from __future__ import annotations

import torch

from saei_fast.ops import _linear_fused, _linear_torch, _torch_entropy
from saei_fast.ops._linear_chunks import chunks, default_chunk_rows, live_mask, selected_rows


def chunk_rows_for(impl: str, vocab_size: int, hidden: torch.Tensor, chunk_rows: int, **kw):
    """``chunk_rows`` or, when it is 0, the default of the path."""
    if chunk_rows:
        return chunk_rows
    if impl == "triton":
        return _linear_fused.default_chunk_rows(vocab_size, hidden.dtype, hidden.device)
    return default_chunk_rows(vocab_size, hidden.dtype, hidden.device, impl, **kw)


def keep_rows(impl: str, hidden: torch.Tensor, vocab_size: int, chunk_rows: int) -> int:
    """Rows whose logits a training forward keeps for its backward (fused path only): one
    chunk, at most all the rows."""
    if impl != "triton":
        return 0
    return min(hidden.shape[0], chunk_rows_for(impl, vocab_size, hidden, chunk_rows))


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
    / T))`` as in ``entropy_logits``. Masked rows give 0. A label outside ``[0, V)`` gives a
    NaN log-prob (the vocabulary-parallel op marks labels owned by another rank that way).
    ``keep`` > 0 (fused path) keeps the logits of the first ``keep`` computed rows in
    ``kept [keep, V]`` for :func:`linear_backward`."""
    rows = selected_rows(mask)
    if impl == "triton":
        return _linear_fused.forward(hidden, weight, bias, labels, rows, inv_temperature, keep)
    chunk_rows = chunk_rows_for(impl, weight.shape[0], hidden, chunk_rows)
    entropy, logprobs, stats = _linear_torch.forward(
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
    chunk's GEMM adds in fp32 and rounds once).
    """
    N, V = hidden.shape[0], weight.shape[0]
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
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
        _linear_fused.grad_logits(
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
            grad_logits = _linear_fused.grad_logits(
                hidden, weight, bias, rest, start, labels, entropy, stats, grad_entropy,
                grad_logprobs, inv_temperature, buffer[: index.numel()], False,
            )  # fmt: skip
        else:
            grad_logits = _linear_torch.grad_logits_chunk(
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
        return _linear_fused.entropy_with_input_grad(
            hidden, weight, bias, rows, inv_temperature, chunk_rows
        )
    chunk_rows = chunk_rows_for(impl, V, hidden, chunk_rows, acc_buffers=2)
    return _linear_torch.entropy_with_input_grad(
        hidden, weight, bias, rows, inv_temperature, impl, chunk_rows
    )
