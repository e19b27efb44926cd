"""Launchers of the entropy kernels: allocate the outputs, choose the configuration
(``config``), launch (``kernels``).

:func:`entropy_fwd` returns the per-token entropy, label log-probs and the row statistics
the backward needs; :func:`entropy_bwd` writes the gradient w.r.t. the logits;
:func:`lse_from_stats` turns the statistics into the log-sum-exp. The choices that are not
read from the tensors (target for CPU tensors, the opt-in configuration search) come in as
:class:`~saei_fast.kernels.plan.KernelOptions` from the host's dispatch.
"""

from __future__ import annotations

import functools

import torch
import triton

from saei_fast.kernels.entropy.config import EntropyConfig, entropy_config
from saei_fast.kernels.entropy.kernels import (
    LOG2E_VALUE,
    _entropy_bwd_kernel,
    _entropy_fwd_kernel,
    _entropy_fwd_split_kernel,
)
from saei_fast.kernels.plan import DEFAULT_OPTIONS, KernelOptions


@functools.cache
def _tuned(kernel, element_size: int, restore: tuple[str, ...] = ()):
    # Opt-in search (options.autotune: SAEI_AUTOTUNE=1) over whole-row launches. The key holds
    # the vocabulary size only: completion lengths change every RL batch and must not trigger
    # a new search.
    # Every candidate keeps at most 32 bytes of a row per thread, as the shipped tiles do.
    configs = [
        triton.Config({"BLOCK_V": warps * 32 * per_thread // element_size}, num_warps=warps)
        for warps in (4, 8, 16)
        for per_thread in (16, 32)
    ]
    return triton.autotune(
        configs, key=["V", "HAS_LABELS", "HAS_MASK"], restore_value=list(restore)
    )(kernel)


def lse_from_stats(stats: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """Log-sum-exp of ``logits / T`` from the forward's ``stats [..., 2]``."""
    return stats[..., 0] * inv_temperature + stats[..., 1]


def _log2_scale(inv_temperature: float) -> float:
    # log2(e) / T, rounded once to fp32 by the launch. For T < ~4e-39 it would overflow to
    # inf (0 * inf = NaN for the maximum logit); FLT_MAX gives the same one-hot distribution.
    return min(inv_temperature * LOG2E_VALUE, torch.finfo(torch.float32).max)


def _rows_view(logits: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` as a 3-D view ``[outer, inner, V]`` without copying when the
    leading dims allow it (plain ``[B, T, V]`` slices such as ``logits[:, :-1]`` always do)."""
    V = logits.shape[-1]
    if logits.dim() == 1:
        view = logits.view(1, 1, V)
    elif logits.dim() == 2:
        view = logits.unsqueeze(0)
    elif logits.dim() == 3:
        view = logits
    else:
        try:
            view = logits.view(-1, logits.shape[-2], V)
        except RuntimeError:  # leading dims that cannot be merged: one copy of the logits
            view = logits.reshape(-1, logits.shape[-2], V)
    if view.stride(2) != 1 and V * view.stride(2) >= 2**31:
        # Offsets inside a row are 32-bit in the kernels.
        view = view.contiguous()
    return view


def _flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # Per-row tensors are indexed with stride 1 in the kernels; autograd hands over
    # expanded (stride-0) gradients, so materialise them.
    return None if tensor is None else tensor.reshape(-1).contiguous()


def _mask_bytes(mask: torch.Tensor | None) -> torch.Tensor | None:
    mask = _flat(mask)
    return None if mask is None else mask.view(torch.uint8)


def _round_to_bf16(dtype: torch.dtype) -> bool:
    # See _to_output: only the CPU interpreter needs the explicit rounding. Whether this
    # kernel runs there was fixed when triton.jit made it (an InterpretedFunction, not a
    # JITFunction), so ask the kernel object rather than the options: a direct call with
    # the default options runs interpreted too.
    interpreted = not isinstance(_entropy_bwd_kernel, triton.runtime.JITFunction)
    return dtype == torch.bfloat16 and interpreted


def _flags(labels: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, bool]:
    return {"HAS_LABELS": labels is not None, "HAS_MASK": mask is not None}


def _launch_options(config: EntropyConfig) -> dict:
    return {
        "BLOCK_V": config.block_v,
        "num_warps": config.num_warps,
        "num_stages": 1,
        **dict(config.options),
    }


def entropy_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    *,
    block_v: int | None = None,
    splits: int | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel on ``logits [..., V]``.

    Returns ``(entropy, logprobs or None, stats)``: float32 shaped like the token dims, and
    ``stats [..., 2]`` = (row max of the raw logits, log-sum-exp of ``(x - max) / T``), what the
    backward needs (see :func:`lse_from_stats`). ``block_v`` and ``splits`` override the
    configuration (see :func:`~saei_fast.kernels.entropy.config.entropy_config`); ``options``
    are the host's (``saei_fast.ops.dispatch.kernel_options()``): the target CPU tensors are
    configured for and the opt-in configuration search.
    """
    token_shape = logits.shape[:-1]
    V = logits.shape[-1]
    view = _rows_view(logits)
    n_rows = view.shape[0] * view.shape[1]
    device = logits.device
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    stats = torch.empty(n_rows, 2, dtype=torch.float32, device=device)
    logprobs = torch.empty_like(entropy) if labels is not None else None
    if n_rows:
        config = entropy_config(
            options.target(device), "fwd", n_rows, V, logits.dtype, block_v=block_v, splits=splits
        )
        args = [view, _flat(labels), _mask_bytes(mask), entropy, logprobs, stats]
        shape = [view.shape[1], view.stride(0), view.stride(1), view.stride(2), V]
        scale = _log2_scale(inv_temperature)
        flags = _flags(labels, mask) | {"VEC": config.vec}
        if config.splits > 1:
            partials = torch.empty(n_rows * config.splits * 3, dtype=torch.float32, device=device)
            counts = torch.zeros(n_rows, dtype=torch.int32, device=device)
            _entropy_fwd_split_kernel[(n_rows, config.splits)](
                *args, partials, counts, *shape, config.chunk, config.splits, scale, **flags,
                MAX_SPLITS=triton.next_power_of_2(config.splits), **_launch_options(config),
            )  # fmt: skip
        elif block_v is None and options.autotune:
            tuned = _tuned(_entropy_fwd_kernel, logits.element_size())
            tuned[(n_rows,)](*args, *shape, scale, **flags)
        else:
            kernel = _entropy_fwd_kernel[(n_rows,)]
            kernel(*args, *shape, scale, **flags, **_launch_options(config))
    return (
        entropy.view(token_shape),
        None if logprobs is None else logprobs.view(token_shape),
        stats.view(*token_shape, 2),
    )


def entropy_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    inv_temperature: float,
    *,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
    splits: int | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Launch the backward kernel: gradient of ``sum(g_H * H + g_logp * logp)`` w.r.t. the
    logits, written in the logits' dtype into ``out`` (a new contiguous tensor if None;
    ``out`` may be ``logits`` itself, since every element is read before it is written, by
    the same thread). Rows that are masked, or whose ``g_H`` and ``g_logp`` are both 0, get
    exactly 0. ``block_v``, ``splits`` and ``options`` as in :func:`entropy_fwd`."""
    V = logits.shape[-1]
    view = _rows_view(logits)
    n_rows = view.shape[0] * view.shape[1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    elif not out.is_contiguous() or out.shape != logits.shape:
        raise ValueError("out must be a contiguous tensor shaped like logits")
    grad_rows = out.view(n_rows, V)
    if grad_logprobs is None:  # no log-prob in the loss: the label term is 0
        labels = None
    if n_rows:
        config = entropy_config(
            options.target(logits.device), "bwd", n_rows, V, logits.dtype, block_v=block_v,
            splits=splits,
        )  # fmt: skip
        args = [
            view, _flat(labels), _mask_bytes(mask), _flat(entropy), _flat(stats),
            _flat(grad_entropy), _flat(grad_logprobs), grad_rows, view.shape[1],
            view.stride(0), view.stride(1), view.stride(2), grad_rows.stride(0), V,
        ]  # fmt: skip
        flags = _flags(labels, mask) | {"ROUND_TO_BF16": _round_to_bf16(logits.dtype)}
        if config.splits == 1 and block_v is None and options.autotune:
            # The gradient may overwrite the logits it reads: restore them between trials.
            tuned = _tuned(_entropy_bwd_kernel, logits.element_size(), ("logits_ptr",))
            tuned[(n_rows, 1)](*args, V, inv_temperature, **flags)
        else:
            kernel = _entropy_bwd_kernel[(n_rows, config.splits)]
            kernel(*args, config.chunk, inv_temperature, **flags, **_launch_options(config))
    return out
