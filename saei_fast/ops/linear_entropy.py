"""Differentiable per-token entropy and label log-probs straight from hidden states and an
lm_head, ``softmax((hidden @ weight.T + bias) / T)``, without building ``[N, V]`` logits.

Memory bound. Only chunks of rows are ever turned into logits (or into their gradient):

* forward, Triton (CUDA, no gradient needed): none at all; the GEMM epilogue keeps online
  statistics (``kernels.linear_entropy``). Extra memory is ``O(N)``.
* forward, chunked (PyTorch path; Triton kept selectable for benchmarks): one ``[c, V]``
  logits chunk at a time.
* backward: the chunk's logits are recomputed (only ``hidden``, ``weight`` and the per-row
  entropy and ``stats = (max logit, log s)`` are saved) and turned into the chunk's gradient
  w.r.t. the logits, then ``grad_hidden[chunk] = g @ weight`` and, only when ``weight`` /
  ``bias`` require grad, ``grad_weight += g.T @ hidden[chunk]`` / ``grad_bias += g.sum(0)``.
  A frozen lm_head gets no ``[V, D]`` gradient, computed or allocated.
* the entropy attack's case (entropy only, frozen lm_head, ``hidden`` requires grad): the
  forward turns each chunk's logits into ``dH/dhidden`` while they are in memory and the
  backward is a per-row scaling: two GEMMs in all instead of three.

The chunk holds ``c = budget // bytes_per_row`` rows: ``budget`` is ``CUDA_CHUNK_BYTES``
(1 GiB) on CUDA and ``CPU_CHUNK_BYTES`` (256 MiB) elsewhere; a row costs ``V`` elements of
the input dtype on the Triton paths (one buffer, overwritten by its gradient) and
``k * V * 4`` bytes on the PyTorch path (``k`` = 3 fp32 buffers alive at once, 2 on the
attack's path, plus a low-precision copy for 16-bit inputs). Peak extra memory is therefore
about ``budget + O(N * D)`` (plus ``[V, D]`` when the weight requires grad), whatever N is.

Masked tokens are skipped entirely (their rows are never multiplied), so prompt and image
tokens cost nothing. Everything is computed from fp32 accumulators; the PyTorch path and the
chunked Triton path round each logits chunk to the input dtype after the GEMM (as ``F.linear``
does), the fused Triton kernels keep fp32 logits.
"""

from __future__ import annotations

import torch

from saei_fast.ops import _torch_entropy
from saei_fast.ops._checks import (
    check_float_tensor,
    check_labels,
    check_mask,
    check_same_device,
    check_same_dtype,
    check_temperature,
    check_tensor,
)
from saei_fast.ops.dispatch import resolve_impl

# Big enough that a chunk's GEMM has the ~200 rows a CPU BLAS needs for full speed at
# V = 152k, and that each buffer is above glibc's 32 MiB mmap threshold (freed buffers go
# back to the system instead of fragmenting the heap).
CPU_CHUNK_BYTES = 256 << 20
CUDA_CHUNK_BYTES = 1 << 30

# Implementations the custom ops accept: the PyTorch path, the fused Triton kernels, and the
# chunked Triton variant (matmul + logits kernels per chunk), kept for benchmarking.
OP_IMPLS = ("torch", "triton", "triton_chunked")

# -------------------------------------------------------------------------------------------
# Chunked computation shared by every implementation (plain tensors, no autograd)
# -------------------------------------------------------------------------------------------


def default_chunk_rows(
    vocab_size: int, dtype: torch.dtype, device: torch.device, impl: str, acc_buffers: int = 3
) -> int:
    """Rows per chunk so that the ``[c, V]`` buffers stay within the device's budget: one in
    the input dtype on the Triton paths, ``acc_buffers`` in the accumulation dtype (plus a
    low-precision copy for 16-bit inputs) on the PyTorch path."""
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    if impl == "torch":
        acc = _torch_entropy.accumulation_dtype(dtype)
        low_precision = dtype.itemsize if dtype != acc else 0
        per_row = vocab_size * (acc_buffers * acc.itemsize + low_precision)
    else:
        per_row = vocab_size * dtype.itemsize
    return max(1, budget // per_row)


def _chunks(n_rows: int, rows: torch.Tensor | None, chunk_rows: int):
    """``(start, index)`` per chunk: ``index`` selects the chunk's rows of ``hidden`` (a
    slice, a view, when every row is computed; else a slice of the selected row indices)."""
    for start in range(0, n_rows, chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        yield start, slice(start, stop) if rows is None else rows[start:stop]


def _selected_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    # One host sync on CUDA (the count is data-dependent); it pays for itself by skipping
    # the GEMM work of every masked row.
    return None if mask is None else mask.nonzero().squeeze(1)


def _chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``[c, V]`` logits in the input dtype (fp32 accumulation inside the GEMM)."""
    if bias is None:
        return torch.mm(hidden_chunk, weight.t())
    return torch.addmm(bias, hidden_chunk, weight.t())


def _acc_logits(logits: torch.Tensor) -> torch.Tensor:
    """A fresh chunk of logits in the accumulation dtype, a buffer the caller may overwrite
    (no copy when the GEMM already produced it in that dtype)."""
    return logits.to(_torch_entropy.accumulation_dtype(logits.dtype))


def _owned_labels(labels: torch.Tensor, vocab_size: int):
    """Labels clamped into ``[0, V)`` for gathers, and where they really were in range."""
    in_range = (labels >= 0) & (labels < vocab_size)
    return labels.clamp(0, vocab_size - 1).long(), in_range


def linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(entropy [N], logprobs [N] or None, stats [N, 2])`` per row of ``hidden [N, D]`` in the
    accumulation dtype, ``stats = (max logit, log sum exp((x - max) / T))`` as in
    ``entropy_logits``. Masked rows give 0. A label outside ``[0, V)`` gives a NaN log-prob
    (the vocabulary-parallel op marks labels owned by another rank that way)."""
    rows = _selected_rows(mask)
    if impl == "triton":
        from saei_fast.kernels.linear_entropy import linear_entropy_fwd

        return linear_entropy_fwd(hidden, weight, bias, rows, labels, inv_temperature)

    N, V = hidden.shape[0], weight.shape[0]
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
    entropy = torch.zeros(N, dtype=acc, device=hidden.device)
    stats = torch.zeros(N, 2, dtype=acc, device=hidden.device)
    logprobs = torch.zeros_like(entropy) if labels is not None else None
    n_rows = N if rows is None else rows.numel()
    chunk_rows = chunk_rows or default_chunk_rows(V, hidden.dtype, hidden.device, impl)
    for _, index in _chunks(n_rows, rows, chunk_rows):
        logits = _chunk_logits(hidden[index], weight, bias)
        chunk_labels = None if labels is None else labels[index]
        if impl == "triton_chunked":
            from saei_fast.kernels.entropy_logits import entropy_fwd

            h, lp, chunk_stats = entropy_fwd(logits, chunk_labels, None, inv_temperature)
        else:
            x = _acc_logits(logits)
            del logits
            safe_labels = in_range = None
            if chunk_labels is not None:
                safe_labels, in_range = _owned_labels(chunk_labels, V)
            h, lp, chunk_stats = _torch_entropy.rows_forward(x, safe_labels, inv_temperature)
            if lp is not None:
                lp = torch.where(in_range, lp, torch.nan)
        entropy[index] = h
        stats[index] = chunk_stats
        if logprobs is not None:
            logprobs[index] = lp
    return entropy, logprobs, stats


def _grad_logits_chunk(
    impl, hidden, weight, bias, rows, start, index, labels, entropy, stats, g_h, g_lp, inv_t
) -> torch.Tensor:
    """The chunk's gradient w.r.t. its logits, ``[c, V]`` in the weight's dtype."""
    if impl == "triton":
        from saei_fast.kernels.linear_entropy import linear_entropy_grad_logits

        n = (index.stop - index.start) if rows is None else index.numel()
        out = torch.empty(n, weight.shape[0], dtype=weight.dtype, device=weight.device)
        return linear_entropy_grad_logits(
            hidden, weight, bias, rows, start, labels, entropy, stats, g_h, g_lp, inv_t, out
        )
    logits = _chunk_logits(hidden[index], weight, bias)
    chunk_labels = None if labels is None else labels[index]
    chunk_g_lp = None if g_lp is None else g_lp[index]
    if impl == "triton_chunked":
        from saei_fast.kernels.entropy_logits import entropy_bwd

        # In place: the chunk's logits become their gradient.
        return entropy_bwd(
            logits,
            chunk_labels,
            None,
            entropy[index],
            stats[index],
            g_h[index],
            chunk_g_lp,
            inv_t,
            out=logits,
        )
    x = _acc_logits(logits)
    del logits
    grad = _torch_entropy.rows_backward(
        x, stats[index], entropy[index], g_h[index], chunk_g_lp, None, inv_t
    )
    if chunk_labels is not None:
        # The one-hot term, only for labels this weight owns (see linear_forward).
        safe_labels, in_range = _owned_labels(chunk_labels, weight.shape[0])
        onehot = torch.where(in_range, chunk_g_lp * inv_t, 0.0)
        grad.scatter_add_(1, safe_labels.unsqueeze(1), onehot.unsqueeze(1))
    return grad.to(weight.dtype)


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(g_H * H + g_logp * logp)`` w.r.t. ``hidden`` (always), ``weight``
    and ``bias`` (None unless asked for), recomputing each chunk's logits.

    ``entropy`` / ``stats`` are the statistics the gradient is taken at (the
    vocabulary-parallel op passes the global ones with a shard of the weight). A 16-bit
    ``grad_weight`` is accumulated over chunks in its own dtype (each chunk's GEMM adds in
    fp32 and rounds once).
    """
    rows = _selected_rows(mask)
    N, V = hidden.shape[0], weight.shape[0]
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
    if grad_logprobs is None:
        labels = None
    # Per-row tensors are read with unit stride; autograd hands over expanded gradients.
    grad_entropy = grad_entropy.to(acc).contiguous()
    if grad_logprobs is not None:
        grad_logprobs = grad_logprobs.to(acc).contiguous()
    entropy, stats = entropy.contiguous(), stats.contiguous()

    make = torch.empty if rows is None else torch.zeros
    grad_hidden = make(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    grad_weight = None
    if weight_grad:
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    grad_bias = torch.zeros(V, dtype=acc, device=hidden.device) if bias_grad else None
    n_rows = N if rows is None else rows.numel()
    chunk_rows = chunk_rows or default_chunk_rows(V, hidden.dtype, hidden.device, impl)
    for start, index in _chunks(n_rows, rows, chunk_rows):
        grad_logits = _grad_logits_chunk(
            impl,
            hidden,
            weight,
            bias,
            rows,
            start,
            index,
            labels,
            entropy,
            stats,
            grad_entropy,
            grad_logprobs,
            inv_temperature,
        )
        grad_hidden[index] = torch.mm(grad_logits, weight)
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), hidden[index])
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0, dtype=acc)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def _entropy_and_logits_grad(x: torch.Tensor, scratch: torch.Tensor, inv_temperature: float):
    """Entropy of each row of raw logits ``x [c, V]`` (accumulation dtype), and ``dH/dx``
    written over ``x``; ``scratch`` is a second ``[c, V]`` buffer. Two buffers in all.

    Same statistics as ``_torch_entropy.rows_forward`` (shift by the row max before scaling
    by ``1/T``), then ``dH/dx = p * (-log p - H) / T = (e / s) * (w / s - d) / T`` with
    ``d = (x - max) / T``, ``e = exp(d)``, ``s = sum e``, ``w = sum e * d``.
    """
    d = x.sub_(x.amax(dim=1, keepdim=True))
    if inv_temperature != 1.0:
        d.mul_(inv_temperature)
    e = torch.exp(d, out=scratch)
    total = e.sum(dim=1, keepdim=True)
    # Clamp -inf logits to a finite value whose exp is already 0, so that 0 * (-inf) never
    # appears below (see _torch_entropy._log_smallest).
    d.clamp_(min=_torch_entropy._log_smallest(d.dtype))
    # sum(e * d) column block by column block: no third [c, V] buffer, and pairwise
    # summation within each block.
    weighted = torch.zeros_like(total)
    for start in range(0, d.shape[1], 16384):
        block = slice(start, start + 16384)
        weighted += (e[:, block] * d[:, block]).sum(dim=1, keepdim=True)
    mean_d = weighted / total
    entropy = total.log() - mean_d
    grad = d.neg_().add_(mean_d).mul_(e).mul_(inv_temperature / total)
    return entropy.squeeze(1), grad


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
    backward of ``sum(g_H * H)`` is ``g_H[:, None] * dH/dhidden``: no recompute. Each
    chunk's logits are turned into ``dH/dlogits`` while they are in memory, then
    ``dH/dhidden = dH/dlogits @ weight``: two GEMMs in all, as for the naive op, where
    recomputing in the backward needs three. The result is in the hidden dtype; masked
    rows give 0. The chunk buffers are allocated once and reused.
    """
    rows = _selected_rows(mask)
    N, V = hidden.shape[0], weight.shape[0]
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
    entropy = torch.zeros(N, dtype=acc, device=hidden.device)
    make = torch.empty if rows is None else torch.zeros
    input_grad = make(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    n_rows = N if rows is None else rows.numel()
    if n_rows == 0:
        return entropy, input_grad
    chunk_rows = chunk_rows or default_chunk_rows(
        V, hidden.dtype, hidden.device, impl, acc_buffers=2
    )
    chunk_rows = min(chunk_rows, n_rows)
    if impl == "torch":
        buffers = torch.empty(2, chunk_rows, V, dtype=acc, device=hidden.device)
    else:
        buffers = torch.empty(1, chunk_rows, V, dtype=hidden.dtype, device=hidden.device)
    for _, index in _chunks(n_rows, rows, chunk_rows):
        hidden_chunk = hidden[index]
        logits = buffers[0, : hidden_chunk.shape[0]]
        if hidden.dtype == logits.dtype:
            if bias is None:
                torch.mm(hidden_chunk, weight.t(), out=logits)
            else:
                torch.addmm(bias, hidden_chunk, weight.t(), out=logits)
        else:
            logits.copy_(_chunk_logits(hidden_chunk, weight, bias))
        if impl == "torch":
            scratch = buffers[1, : hidden_chunk.shape[0]]
            h, grad_logits = _entropy_and_logits_grad(logits, scratch, inv_temperature)
            grad_logits = grad_logits.to(weight.dtype)
        else:
            from saei_fast.kernels.entropy_logits import entropy_bwd, entropy_fwd

            h, _, stats = entropy_fwd(logits, None, None, inv_temperature)
            ones = torch.ones_like(h)
            # In place: the chunk's logits become dH/dlogits.
            grad_logits = entropy_bwd(
                logits, None, None, h, stats, ones, None, inv_temperature, out=logits
            )
        entropy[index] = h
        input_grad[index] = torch.mm(grad_logits, weight)
    return entropy, input_grad


# -------------------------------------------------------------------------------------------
# Custom ops: forward and backward, so torch.compile sees opaque nodes
# -------------------------------------------------------------------------------------------


def _op_impl(impl: str, hidden: torch.Tensor) -> str:
    if impl not in OP_IMPLS:
        raise ValueError(f"impl must be one of {OP_IMPLS}, got {impl!r}")
    # float64 (gradient checks) always runs on the PyTorch path: the kernels accumulate in fp32.
    return "torch" if hidden.dtype == torch.float64 else impl


@torch.library.custom_op("saei_fast::linear_entropy", mutates_args=())
def _linear_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    entropy, logprobs, stats = linear_forward(
        hidden, weight, bias, labels, mask, inv_temperature, _op_impl(impl, hidden), chunk_rows
    )
    if logprobs is None:  # custom ops cannot return None
        logprobs = entropy.new_empty(0)
    return entropy, logprobs, stats


@_linear_entropy_op.register_fake
def _(hidden, weight, bias, labels, mask, inv_temperature, impl, chunk_rows):
    n = hidden.shape[0]
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
    entropy = hidden.new_empty(n, dtype=acc)
    logprobs = entropy.new_empty(n if labels is not None else 0)
    return entropy, logprobs, entropy.new_empty(n, 2)


@torch.library.custom_op("saei_fast::linear_entropy_backward", mutates_args=())
def _linear_entropy_backward_op(
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
        _op_impl(impl, hidden),
        chunk_rows,
        weight_grad,
        bias_grad,
    )
    # Custom ops cannot return None (nor one tensor twice): an empty tensor stands for
    # "not requested".
    return (
        grad_hidden,
        hidden.new_empty(0) if grad_weight is None else grad_weight,
        hidden.new_empty(0) if grad_bias is None else grad_bias,
    )


@_linear_entropy_backward_op.register_fake
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
    hidden, weight, bias, labels, mask, inv_temperature, impl, chunk_rows = inputs
    entropy, _, stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, mask, entropy, stats)
    ctx.inv_temperature = inv_temperature
    ctx.impl = impl
    ctx.chunk_rows = chunk_rows
    ctx.has_labels = labels is not None


def _backward(ctx, grad_entropy, grad_logprobs, _grad_stats):
    hidden, weight, bias, labels, mask, entropy, stats = ctx.saved_tensors
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(entropy)
    if not ctx.has_labels:
        grad_logprobs = None
    weight_grad = ctx.needs_input_grad[1]
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    grad_hidden, grad_weight, grad_bias = _linear_entropy_backward_op(
        hidden,
        weight,
        bias,
        labels,
        mask,
        entropy,
        stats,
        grad_entropy,
        grad_logprobs,
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
    )


_linear_entropy_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("saei_fast::linear_entropy_with_input_grad", mutates_args=())
def _linear_entropy_input_grad_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _op_impl(impl, hidden)
    # Both Triton variants take the chunked route: the gradient needs the chunk's logits.
    impl = "torch" if impl == "torch" else "triton_chunked"
    return linear_entropy_with_input_grad(
        hidden, weight, bias, mask, inv_temperature, impl, chunk_rows
    )


@_linear_entropy_input_grad_op.register_fake
def _(hidden, weight, bias, mask, inv_temperature, impl, chunk_rows):
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=acc), torch.empty_like(hidden)


def _setup_input_grad_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _input_grad_backward(ctx, grad_entropy, _grad_input_grad):
    (input_grad,) = ctx.saved_tensors
    grad_hidden = None
    if grad_entropy is not None:
        grad_hidden = (grad_entropy.unsqueeze(1) * input_grad).to(input_grad.dtype)
    return grad_hidden, None, None, None, None, None, None


_linear_entropy_input_grad_op.register_autograd(
    _input_grad_backward, setup_context=_setup_input_grad_context
)

# -------------------------------------------------------------------------------------------
# Public functions
# -------------------------------------------------------------------------------------------


def _check_linear(hidden: object, weight: object, bias: object):
    hidden = check_float_tensor("hidden", hidden, min_dim=1)
    weight = check_float_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, {hidden.shape[-1]}] (an lm_head over the last dim "
            f"of hidden), got {tuple(weight.shape)}"
        )
    if hidden.shape[-1] == 0 or weight.shape[0] == 0:
        raise ValueError(
            f"hidden and weight must have non-empty hidden and vocab dims, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    check_same_dtype("weight", weight, hidden, "hidden")
    check_same_device("weight", weight, hidden, "hidden")
    if bias is not None:
        bias = check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) (one per vocab row of weight), "
                f"got {tuple(bias.shape)}"
            )
        check_same_dtype("bias", bias, weight, "weight")
        check_same_device("bias", bias, hidden, "hidden")
    return hidden, weight, bias


def _check_chunk_rows(chunk_rows: object) -> int:
    if chunk_rows is None:
        return 0
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return chunk_rows


def _frozen_head_needs_input_grad(hidden, weight, bias, labels) -> bool:
    return (
        labels is None
        and torch.is_grad_enabled()
        and hidden.requires_grad
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
    )


def linear_logprobs_and_entropy_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    process_group=None,
    impl: str | None = None,
    fused: bool = True,
    chunk_rows: int | None = None,
    input_grad_in_forward: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Shared body of the public functions, with the internal knobs that tests and benchmarks
    use: ``fused=False`` runs the chunked Triton forward and backward (matmul + logits
    kernels) instead of the fused kernels; ``chunk_rows`` overrides the chunk size;
    ``input_grad_in_forward=False`` turns off the frozen-lm_head fast path (see below).

    Entropy only, a frozen lm_head (weight and bias not requiring grad) and a ``hidden`` that
    requires grad is the entropy attack's case: the forward then also computes
    ``dH/dhidden`` (``linear_entropy_with_input_grad``) and the backward is a per-row scaling,
    two GEMMs in all instead of three. Otherwise the backward recomputes each chunk.

    Returns ``(logprobs or None, entropy)`` shaped like the token dims of ``hidden``.
    """
    hidden, weight, bias = _check_linear(hidden, weight, bias)
    temperature = check_temperature(temperature)
    chunk_rows = _check_chunk_rows(chunk_rows)
    token_shape = hidden.shape[:-1]
    mask = check_mask(mask, token_shape, hidden, "hidden")
    layout = None
    vocab_size = weight.shape[0]
    if process_group is not None:
        from saei_fast.ops._vocab_parallel import shard_layout

        layout = shard_layout(weight.shape[0], process_group, hidden.device)
        vocab_size = layout.vocab_size
    if labels is not None:
        labels = check_labels(labels, token_shape, vocab_size, mask, hidden, "hidden")
    op_impl = resolve_impl(impl, hidden.device)
    if op_impl == "triton" and not fused:
        op_impl = "triton_chunked"

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    flat_mask = None if mask is None else mask.reshape(-1)
    inv_temperature = 1.0 / temperature
    if layout is not None:
        from saei_fast.ops._vocab_parallel import vocab_parallel_linear_entropy

        entropy, logprobs = vocab_parallel_linear_entropy(
            flat_hidden,
            weight,
            bias,
            flat_labels,
            flat_mask,
            inv_temperature,
            op_impl,
            chunk_rows,
            layout,
            process_group,
        )
    elif input_grad_in_forward and _frozen_head_needs_input_grad(hidden, weight, bias, labels):
        entropy, _ = _linear_entropy_input_grad_op(
            flat_hidden, weight, bias, flat_mask, inv_temperature, op_impl, chunk_rows
        )
        logprobs = None
    else:
        entropy, logprobs, _ = _linear_entropy_op(
            flat_hidden, weight, bias, flat_labels, flat_mask, inv_temperature, op_impl, chunk_rows
        )
    entropy = entropy.view(token_shape)
    return (None if labels is None else logprobs.view(token_shape)), entropy


def linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    process_group=None,
    impl: str | None = None,
) -> torch.Tensor:
    """Per-token entropy (nats) of ``softmax((hidden @ weight.T + bias) / temperature)``,
    without building the ``[N, V]`` logits (see the module docstring for the memory bound).

    Args:
        hidden: ``[..., D]`` float16 / bfloat16 / float32 / float64 (e.g. the last hidden
            states ``[B, T, D]``; leading dims may be non-contiguous).
        weight: ``[V, D]`` lm_head weight, same dtype and device as ``hidden``. With a
            ``process_group``, this rank's shard ``[V_r, D]`` of a vocabulary-parallel
            lm_head (see ``process_group``).
        bias: optional ``[V]`` (``[V_r]`` with a process group), same dtype as ``weight``.
        temperature: sampling temperature, a Python float > 0 (a runtime value: changing it
            never recompiles a kernel).
        mask: optional bool ``[...]``; False positions give 0, receive 0 gradient and cost no
            compute.
        process_group: optional ``torch.distributed`` group over which the vocabulary is
            sharded: rank ``r`` holds rows ``[offset_r, offset_r + V_r)`` of the full weight,
            with the offsets taken from an all-gather of ``V_r`` in rank order (shards may be
            uneven). ``hidden`` (and ``mask``) must be the same on every rank; every rank gets
            the exact full-vocabulary result, and the gradient w.r.t. ``hidden`` is the full
            one (already summed over ranks). Eager only: not traceable by ``torch.compile``.
        impl: ``"triton"``, ``"torch"`` or None (``SAEI_IMPL`` or automatic by device).

    Returns:
        ``[...]`` float32 (float64 for float64 inputs), differentiable w.r.t. ``hidden`` and,
        when they require grad, ``weight`` and ``bias``.

    Raises:
        TypeError: non-tensor or non-float inputs, mismatched dtypes, wrong mask dtype,
            non-float temperature.
        ValueError: shape or device mismatch, empty dims, ``temperature <= 0``.
    """
    _, entropy = linear_logprobs_and_entropy_impl(
        hidden,
        weight,
        None,
        bias=bias,
        temperature=temperature,
        mask=mask,
        process_group=process_group,
        impl=impl,
    )
    return entropy


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    process_group=None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(labels), entropy)`` of ``softmax((hidden @ weight.T + bias) / temperature)``
    in one pass, without building the ``[N, V]`` logits.

    Args:
        hidden, weight, bias, temperature, mask, process_group, impl: as in
            :func:`linear_entropy`.
        labels: int32/int64 ``[...]`` in ``[0, V)`` wherever ``mask`` is True (masked
            positions may hold anything, e.g. -100). With a process group these are global
            vocabulary ids in ``[0, sum_r V_r)``.

    Returns:
        Two ``[...]`` float32 tensors (float64 for float64 inputs), differentiable like
        :func:`linear_entropy`; masked positions are 0.

    Raises:
        TypeError / ValueError: as :func:`linear_entropy`, plus wrong label dtype, shape or
            range.
    """
    logprobs, entropy = linear_logprobs_and_entropy_impl(
        hidden,
        weight,
        check_tensor("labels", labels),
        bias=bias,
        temperature=temperature,
        mask=mask,
        process_group=process_group,
        impl=impl,
    )
    return logprobs, entropy


__all__ = ["linear_entropy", "linear_logprobs_and_entropy"]
