"""Differentiable per-token entropy and label log-probs straight from hidden states and an
lm_head, ``softmax((hidden @ weight.T + bias) / T)``, without building ``[N, V]`` logits:
the custom ops (so ``torch.compile`` sees opaque nodes with a registered backward), their
autograd, and the public functions.

Memory bound: only chunks of rows are ever turned into logits (``_linear_chunks``):

* forward, Triton (CUDA): none at all when no gradient is needed; the GEMM epilogue keeps
  online statistics (``kernels.linear_entropy``). When a backward will follow, the logits of
  one chunk of rows are kept for it (3 GEMMs in all for those rows instead of 4). A loss
  that is a sum of per-token terms can go through ``linear_loss.linear_token_loss`` instead,
  which forms the gradient in the forward: 3 GEMMs for every row.
* forward, PyTorch path (and the chunked Triton variant kept for benchmarks): one ``[c, V]``
  logits chunk at a time.
* backward: the chunk's logits are read back (kept) or recomputed and turned into the
  chunk's gradient w.r.t. the logits, then ``grad_hidden[chunk] = g @ weight`` and, only when
  ``weight`` / ``bias`` require grad, ``grad_weight += g.T @ hidden[chunk]`` /
  ``grad_bias += g.sum(0)``. A frozen lm_head gets no ``[V, D]`` gradient, computed or
  allocated.
* the entropy attack's case (entropy only, frozen lm_head, ``hidden`` requires grad): the
  forward turns each chunk's logits into ``dH/dhidden`` while they are in memory and the
  backward is a per-row scaling: two GEMMs in all.

Peak extra memory is about one chunk budget + ``O(N * D)`` (plus ``[V, D]`` when the weight
requires grad), whatever N is. Masked tokens cost nothing; in the backward a row whose
upstream gradients are all 0 is treated as masked (see ``_linear_paths``).

The implementations live below this module: ``_linear_paths`` (dispatch, shared with the
vocabulary-parallel op in ``_vocab_parallel``), ``_linear_fused`` (Triton kernels),
``_linear_torch`` (chunks of materialised logits), ``_linear_chunks`` (chunk sizing).
"""

from __future__ import annotations

import torch

from saei_fast.ops import _torch_entropy
from saei_fast.ops._linear_paths import (
    keep_rows,
    linear_backward,
    linear_entropy_with_input_grad,
    linear_forward,
)
from saei_fast.ops.dispatch import resolve_impl, triton_interpreting
from saei_fast.validation import (
    check_float_tensor,
    check_labels,
    check_mask,
    check_same_device,
    check_same_dtype,
    check_temperature,
    check_tensor,
)

# Implementations the custom ops accept: the PyTorch path, the fused Triton kernels, and the
# chunked Triton variant (matmul + logits kernels per chunk), kept for benchmarking.
OP_IMPLS = ("torch", "triton", "triton_chunked")

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
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    entropy, logprobs, stats, kept = linear_forward(
        hidden,
        weight,
        bias,
        labels,
        mask,
        inv_temperature,
        _op_impl(impl, hidden),
        chunk_rows,
        keep if _op_impl(impl, hidden) == "triton" else 0,
    )
    # Custom ops cannot return None: empty tensors stand for "none".
    if logprobs is None:
        logprobs = entropy.new_empty(0)
    if kept is None:
        kept = hidden.new_empty(0)
    return entropy, logprobs, stats, kept


@_linear_entropy_op.register_fake
def _(hidden, weight, bias, labels, mask, inv_temperature, impl, chunk_rows, keep):
    n = hidden.shape[0]
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
    entropy = hidden.new_empty(n, dtype=acc)
    logprobs = entropy.new_empty(n if labels is not None else 0)
    keeps = keep and _op_impl(impl, hidden) == "triton"
    kept = hidden.new_empty(keep, weight.shape[0]) if keeps else hidden.new_empty(0)
    return entropy, logprobs, entropy.new_empty(n, 2), kept


@torch.library.custom_op("saei_fast::linear_entropy_backward", mutates_args=("kept",))
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
        _op_impl(impl, hidden),
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
    return linear_entropy_with_input_grad(
        hidden, weight, bias, mask, inv_temperature, _op_impl(impl, hidden), chunk_rows
    )


@_linear_entropy_input_grad_op.register_fake
def _(hidden, weight, bias, mask, inv_temperature, impl, chunk_rows):
    acc = _torch_entropy.accumulation_dtype(hidden.dtype)
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


def _check_interpreter_dtype(op_impl: str, hidden: torch.Tensor) -> None:
    """Triton's CPU interpreter computes ``tl.dot`` on bfloat16 operands wrongly (it reads
    them as integers): refuse rather than return wrong numbers."""
    if op_impl == "triton" and hidden.dtype == torch.bfloat16 and triton_interpreting():
        raise ValueError(
            "impl='triton' (or SAEI_IMPL=triton) with TRITON_INTERPRET=1 cannot run the fused "
            "linear-entropy kernels on bfloat16 hidden states: Triton's CPU interpreter "
            "computes tl.dot on bfloat16 operands wrongly; use impl='torch', or float16 / "
            "float32 inputs, or a GPU"
        )


def _backward_follows(hidden, weight, bias) -> bool:
    """A graph is being recorded through the op (a backward may follow)."""
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
    _check_interpreter_dtype(op_impl, hidden)

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
        keep = 0
        if _backward_follows(hidden, weight, bias) and not torch.compiler.is_compiling():
            # Kept logits are handed from the forward to the backward outside the saved
            # tensors (see _setup_context), which a compiled graph cannot do: compiled
            # graphs recompute.
            keep = keep_rows(op_impl, flat_hidden, weight.shape[0], chunk_rows)
        entropy, logprobs, _, _ = _linear_entropy_op(
            flat_hidden,
            weight,
            bias,
            flat_labels,
            flat_mask,
            inv_temperature,
            op_impl,
            chunk_rows,
            keep,
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
