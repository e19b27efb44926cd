"""Differentiable per-token entropy and label log-probs from logits.

``entropy`` and ``logprobs_and_entropy`` validate their arguments, pick the implementation
(Triton on CUDA, the chunked PyTorch path on CPU and for float64; see ``ops.dispatch``) and
call one ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` sees a single
opaque node with a registered backward. The op's forward and backward run ``triton_path``
or ``torch_path``.
"""

from __future__ import annotations

import torch

from saei_fast.ops.dispatch import op_impl
from saei_fast.ops.entropy import torch_path, triton_path
from saei_fast.validation import check_float_tensor, check_labels, check_mask, check_temperature

# -------------------------------------------------------------------------------------------
# Custom ops: forward and backward, each dispatching to Triton or PyTorch
# -------------------------------------------------------------------------------------------


def _output_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch_path.accumulation_dtype(logits.dtype)


@torch.library.custom_op("saei_fast::entropy_from_logits", mutates_args=())
def _entropy_op(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = triton_path if impl == "triton" else torch_path
    entropy, logprobs, stats = path.entropy_forward(logits, labels, mask, inv_temperature)
    if logprobs is None:  # custom ops cannot return None
        logprobs = entropy.new_empty(0)
    return entropy, logprobs, stats


@_entropy_op.register_fake
def _(logits, labels, mask, inv_temperature, impl):
    token_shape = logits.shape[:-1]
    entropy = logits.new_empty(token_shape, dtype=_output_dtype(logits))
    logprobs = entropy.new_empty(token_shape if labels is not None else (0,))
    return entropy, logprobs, entropy.new_empty((*token_shape, 2))


@torch.library.custom_op("saei_fast::entropy_from_logits_backward", mutates_args=())
def _entropy_backward_op(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
) -> torch.Tensor:
    path = triton_path if impl == "triton" else torch_path
    return path.entropy_backward(
        logits, labels, mask, entropy, stats, grad_entropy, grad_logprobs, inv_temperature
    )


@_entropy_backward_op.register_fake
def _(logits, labels, mask, entropy, stats, grad_entropy, grad_logprobs, inv_temperature, impl):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, mask, inv_temperature, impl = inputs
    entropy, _, stats = output
    ctx.save_for_backward(logits, labels, mask, entropy, stats)
    ctx.inv_temperature = inv_temperature
    ctx.impl = impl
    ctx.has_labels = labels is not None


def _backward(ctx, grad_entropy, grad_logprobs, _grad_stats):
    logits, labels, mask, entropy, stats = ctx.saved_tensors
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(entropy)
    if not ctx.has_labels:
        grad_logprobs = None
    grad_logits = _entropy_backward_op(
        logits,
        labels,
        mask,
        entropy,
        stats,
        grad_entropy,
        grad_logprobs,
        ctx.inv_temperature,
        ctx.impl,
    )
    return grad_logits, None, None, None, None


_entropy_op.register_autograd(_backward, setup_context=_setup_context)

# -------------------------------------------------------------------------------------------
# Public functions
# -------------------------------------------------------------------------------------------


def _check_logits(logits: object) -> torch.Tensor:
    logits = check_float_tensor("logits", logits, min_dim=1)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocab dim, got shape {tuple(logits.shape)}")
    return logits


def entropy(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Per-token entropy (nats) of ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float16 / bfloat16 / float32 / float64; the leading dims may be
            non-contiguous (e.g. ``logits[:, :-1]``). ``-inf`` entries (a masked vocabulary)
            are allowed; a row of only ``-inf`` has no distribution and gives NaN.
        temperature: sampling temperature, a Python float > 0 (a runtime value: changing it
            never recompiles a kernel).
        mask: optional bool ``[...]``; False positions give 0 and receive 0 gradient.
        impl: ``"triton"``, ``"torch"`` or None (``SAEI_IMPL`` or automatic by device).

    Returns:
        ``[...]`` float32 (float64 for float64 logits), differentiable w.r.t. ``logits``.
        A position whose upstream gradient is 0 is treated as masked in the backward: it
        gets exactly 0 gradient even when its logits are not finite (so an all ``-inf`` row
        left out of the loss with ``torch.where`` does not turn the gradient into NaN).

    Raises:
        TypeError: ``logits``/``mask`` of the wrong type or dtype, non-float temperature.
        ValueError: shape or device mismatch, ``temperature <= 0``, empty vocab dim.
    """
    logits = _check_logits(logits)
    temperature = check_temperature(temperature)
    mask = check_mask(mask, logits.shape[:-1], logits, "logits")
    impl = op_impl(impl, logits)
    entropy_values, _, _ = _entropy_op(logits, None, mask, 1.0 / temperature, impl)
    return entropy_values


def logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(labels), entropy)`` of ``softmax(logits / temperature)`` in one pass.

    Args:
        logits: ``[..., V]``, as in :func:`entropy`.
        labels: int32/int64 ``[...]`` in ``[0, V)`` wherever ``mask`` is True (masked
            positions may hold anything, e.g. -100).
        temperature, mask, impl: as in :func:`entropy`.

    Returns:
        Two ``[...]`` float32 tensors (float64 for float64 logits), both differentiable
        w.r.t. ``logits``; masked positions are 0. A position whose upstream gradients are
        both 0 gets exactly 0 gradient, as in :func:`entropy`.

    Raises:
        TypeError / ValueError: as :func:`entropy`, plus wrong label dtype, shape or range.
    """
    logits = _check_logits(logits)
    temperature = check_temperature(temperature)
    token_shape = logits.shape[:-1]
    mask = check_mask(mask, token_shape, logits, "logits")
    labels = check_labels(labels, token_shape, logits.shape[-1], mask, logits, "logits")
    impl = op_impl(impl, logits)
    entropy_values, logprobs, _ = _entropy_op(logits, labels, mask, 1.0 / temperature, impl)
    return logprobs, entropy_values
