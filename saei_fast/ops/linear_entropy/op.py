"""The linear-entropy op's public functions: per-token entropy and label log-probs straight
from hidden states and an lm_head, ``softmax((hidden @ weight.T + bias) / T)``, without
building ``[N, V]`` logits (the package docstring has the memory bound and the GEMM counts).
Argument checks (shared with the loss head, ``ops/linear_loss``), the one choice of path
(``dispatch.op_impl``), and the private hook that benchmarks and tests use to reach the
internal variants; the custom ops and their autograd are in ``custom_ops``.
"""

from __future__ import annotations

import torch

from saei_fast.ops.dispatch import op_impl, triton_interpreting
from saei_fast.ops.linear_entropy.chunks import keep_rows
from saei_fast.ops.linear_entropy.custom_ops import (
    linear_entropy_input_grad_op,
    linear_entropy_op,
)
from saei_fast.ops.linear_entropy.vocab_parallel import (
    shard_layout,
    vocab_parallel_linear_entropy,
)
from saei_fast.validation import (
    check_float_tensor,
    check_labels,
    check_mask,
    check_same_device,
    check_same_dtype,
    check_temperature,
    check_tensor,
)

# -------------------------------------------------------------------------------------------
# Argument checks
# -------------------------------------------------------------------------------------------


def check_linear(hidden: object, weight: object, bias: object):
    """``(hidden, weight, bias)`` of an lm_head over the last dim of ``hidden``, checked."""
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


def check_chunk_rows(chunk_rows: object) -> int:
    """``chunk_rows`` as an int, 0 for the path's default."""
    if chunk_rows is None:
        return 0
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return chunk_rows


def check_interpreter_dtype(impl: str, hidden: torch.Tensor) -> None:
    """Triton's CPU interpreter computes ``tl.dot`` on bfloat16 operands wrongly (it reads
    them as integers): refuse rather than return wrong numbers."""
    if impl == "triton" and hidden.dtype == torch.bfloat16 and triton_interpreting():
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


# -------------------------------------------------------------------------------------------
# Public functions
# -------------------------------------------------------------------------------------------


def _linear_logprobs_and_entropy_variant(
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
    """Private: for benchmarks and tests. The shared body of the public functions, with the
    internal knobs that tests and benchmarks use (no public name: the public functions pass
    none of them): ``fused=False`` runs the chunked Triton forward and backward (matmul + logits
    kernels) instead of the fused kernels; ``chunk_rows`` overrides the chunk size;
    ``input_grad_in_forward=False`` turns off the frozen-lm_head fast path (see below).

    Entropy only, a frozen lm_head (weight and bias not requiring grad) and a ``hidden`` that
    requires grad is the entropy attack's case: the forward then also computes
    ``dH/dhidden`` (``linear_entropy_with_input_grad``) and the backward is a per-row scaling,
    two GEMMs in all instead of three. Otherwise the backward recomputes each chunk.

    Returns ``(logprobs or None, entropy)`` shaped like the token dims of ``hidden``. Longer
    than most functions because it is the one body of both public functions: checks, the
    path, and the three ways through the op (vocabulary-parallel, frozen head, custom op).
    """
    hidden, weight, bias = check_linear(hidden, weight, bias)
    temperature = check_temperature(temperature)
    chunk_rows = check_chunk_rows(chunk_rows)
    token_shape = hidden.shape[:-1]
    mask = check_mask(mask, token_shape, hidden, "hidden")
    layout = None
    vocab_size = weight.shape[0]
    if process_group is not None:
        layout = shard_layout(weight.shape[0], process_group, hidden.device)
        vocab_size = layout.vocab_size
    if labels is not None:
        labels = check_labels(labels, token_shape, vocab_size, mask, hidden, "hidden")
    # The one dispatch rule (float64 runs on the PyTorch path), then the hidden variant.
    impl = op_impl(impl, hidden)
    if impl == "triton" and not fused:
        impl = "triton_chunked"
    check_interpreter_dtype(impl, hidden)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).contiguous()
    flat_mask = None if mask is None else mask.reshape(-1)
    inv_temperature = 1.0 / temperature
    if layout is not None:
        entropy, logprobs = vocab_parallel_linear_entropy(
            flat_hidden,
            weight,
            bias,
            flat_labels,
            flat_mask,
            inv_temperature,
            impl,
            chunk_rows,
            layout,
            process_group,
        )
    elif input_grad_in_forward and _frozen_head_needs_input_grad(hidden, weight, bias, labels):
        entropy, _ = linear_entropy_input_grad_op(
            flat_hidden, weight, bias, flat_mask, inv_temperature, impl, chunk_rows
        )
        logprobs = None
    else:
        keep = 0
        if _backward_follows(hidden, weight, bias) and not torch.compiler.is_compiling():
            # Kept logits are handed from the forward to the backward outside the saved
            # tensors (see custom_ops._setup_context), which a compiled graph cannot do: compiled
            # graphs recompute.
            keep = keep_rows(impl, flat_hidden, weight.shape[0], chunk_rows)
        entropy, logprobs, _, _ = linear_entropy_op(
            flat_hidden,
            weight,
            bias,
            flat_labels,
            flat_mask,
            inv_temperature,
            impl,
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
    without building the ``[N, V]`` logits (see ``saei_fast.ops.linear_entropy`` for the
    memory bound).

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
    _, entropy = _linear_logprobs_and_entropy_variant(
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
    logprobs, entropy = _linear_logprobs_and_entropy_variant(
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
