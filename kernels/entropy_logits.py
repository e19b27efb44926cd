"""Per-token entropy and label log-probs from logits: Triton kernels and their launchers.

Forward: one program per token row streams the vocabulary in blocks, keeping an online
maximum ``m`` of the raw logits x, ``s = sum exp(d)`` and ``w = sum exp(d) * d`` in fp32, where
``d = (x - m) / T``. Then ``H = log s - w / s``; only ``H``, the label log-prob and two row
statistics ``(m, log s)`` are written (no softmax tensor; ``lse = m / T + log s``). Shifting
by the maximum before dividing by T keeps every quantity small, so large logits lose no
precision to ``x / T`` rounding or to the cancellation of ``lse - E[z]``.

Backward: recompute ``log p = (x - m) / T - log s`` block by block and write
``dL/dlogits = [g_H * p * (-log p - H) + g_logp * (onehot(label) - p)] / T``
in the logits' dtype. ``-inf`` logits have ``p = 0`` and get gradient 0 (never NaN).

A row whose logits are all ``-inf`` has no distribution: its entropy and log-prob are NaN.
Masked rows (mask False) are not read: their outputs and gradients are exactly 0.
An out-of-range label gives a NaN log-prob (the host check catches it outside compile).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# -------------------------------------------------------------------------------------------
# Kernels
# -------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["rows_per_outer", "stride_outer", "stride_inner"])
def _entropy_fwd_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    rows_per_outer,
    stride_outer,
    stride_inner,
    stride_v,
    V,
    inv_temperature,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + i_row) != 0
    if not valid:
        tl.store(entropy_ptr + i_row, 0.0)
        tl.store(stats_ptr + 2 * i_row, 0.0)
        tl.store(stats_ptr + 2 * i_row + 1, 0.0)
        if HAS_LABELS:
            tl.store(logprob_ptr + i_row, 0.0)
        return

    # Leading dims may be non-contiguous: the row lives at (outer, inner) of a 3-D view.
    p_row = logits_ptr + (i_row // rows_per_outer) * stride_outer
    p_row += (i_row % rows_per_outer) * stride_inner
    o_v = tl.arange(0, BLOCK_V)

    b_m = tl.full((), float("-inf"), tl.float32)
    b_s = tl.zeros((), tl.float32)
    b_w = tl.zeros((), tl.float32)
    for v_start in range(0, V, BLOCK_V):
        o_cols = v_start + o_v
        # Lanes past V load -inf, so they add exp(-inf) = 0 and never exp(0).
        b_x = tl.load(p_row + o_cols * stride_v, mask=o_cols < V, other=float("-inf"))
        b_x = b_x.to(tl.float32)
        m_new = tl.maximum(b_m, tl.max(b_x, axis=0))
        # While every logit so far is -inf there is no finite maximum to shift by.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_d = (b_x - m_safe) * inv_temperature
        b_e = tl.exp(b_d)
        b_ed = tl.where(b_e > 0.0, b_e * b_d, 0.0)  # 0 * -inf must count as 0
        shift = (b_m - m_safe) * inv_temperature  # -inf before the first finite logit
        rescale = tl.exp(shift)
        shift = tl.where(b_s > 0.0, shift, 0.0)
        b_w = rescale * (b_w + shift * b_s) + tl.sum(b_ed, axis=0)
        b_s = rescale * b_s + tl.sum(b_e, axis=0)
        b_m = m_new

    log_s = tl.log(b_s)
    tl.store(entropy_ptr + i_row, log_s - b_w / b_s)
    tl.store(stats_ptr + 2 * i_row, b_m)
    tl.store(stats_ptr + 2 * i_row + 1, log_s)
    if HAS_LABELS:
        label = tl.load(labels_ptr + i_row).to(tl.int64)
        in_range = (label >= 0) & (label < V)
        b_label = tl.load(p_row + label * stride_v, mask=in_range, other=0.0)
        logprob = (b_label.to(tl.float32) - b_m) * inv_temperature - log_s
        tl.store(logprob_ptr + i_row, tl.where(in_range, logprob, float("nan")))


@triton.jit(do_not_specialize=["rows_per_outer", "stride_outer", "stride_inner"])
def _entropy_bwd_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    entropy_ptr,
    stats_ptr,
    grad_entropy_ptr,
    grad_logprob_ptr,
    grad_logits_ptr,
    rows_per_outer,
    stride_outer,
    stride_inner,
    stride_v,
    stride_grad_row,
    V,
    inv_temperature,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    o_v = tl.arange(0, BLOCK_V)
    p_grad = grad_logits_ptr + i_row * stride_grad_row

    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + i_row) != 0
    if not valid:
        for v_start in range(0, V, BLOCK_V):
            o_cols = v_start + o_v
            zeros = tl.zeros((BLOCK_V,), tl.float32)
            tl.store(p_grad + o_cols, zeros.to(grad_logits_ptr.dtype.element_ty), mask=o_cols < V)
        return

    p_row = logits_ptr + (i_row // rows_per_outer) * stride_outer
    p_row += (i_row % rows_per_outer) * stride_inner
    row_max = tl.load(stats_ptr + 2 * i_row)
    log_s = tl.load(stats_ptr + 2 * i_row + 1)
    entropy = tl.load(entropy_ptr + i_row)
    g_entropy = tl.load(grad_entropy_ptr + i_row).to(tl.float32)
    g_logprob = 0.0
    label = -1
    if HAS_LABELS:
        g_logprob = tl.load(grad_logprob_ptr + i_row).to(tl.float32)
        label = tl.load(labels_ptr + i_row).to(tl.int64)

    for v_start in range(0, V, BLOCK_V):
        o_cols = v_start + o_v
        m_cols = o_cols < V
        b_x = tl.load(p_row + o_cols * stride_v, mask=m_cols, other=float("-inf"))
        b_logp = (b_x.to(tl.float32) - row_max) * inv_temperature - log_s
        b_p = tl.exp(b_logp)
        # dH/dz = p * (-log p - H); dlogp/dz = onehot - p. p = 0 (a -inf logit) gives 0.
        b_g = tl.where(b_p > 0.0, b_p * (g_entropy * (-b_logp - entropy) - g_logprob), 0.0)
        b_g += tl.where(o_cols == label, g_logprob, 0.0)
        b_g *= inv_temperature
        tl.store(p_grad + o_cols, b_g.to(grad_logits_ptr.dtype.element_ty), mask=m_cols)


# -------------------------------------------------------------------------------------------
# Launchers
# -------------------------------------------------------------------------------------------


def _block_v(V: int, element_size: int) -> int:
    # ~16 KiB of logits per block: wide enough to saturate HBM with 8 warps, small enough to
    # keep the block in registers without spilling.
    cap = 16384 // element_size
    return max(16, min(triton.next_power_of_2(V), cap))


def _num_warps(block_v: int) -> int:
    return 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4


def _autotune_enabled() -> bool:
    return os.environ.get("SAEI_AUTOTUNE", "0") not in ("", "0")


_TUNING_CONFIGS = [
    triton.Config({"BLOCK_V": block}, num_warps=warps)
    for block in (1024, 2048, 4096, 8192)
    for warps in (4, 8, 16)
]


@functools.cache
def _tuned(kernel, restore: tuple[str, ...] = ()):
    # Opt-in search (SAEI_AUTOTUNE=1). The key holds the vocabulary size and dtype only:
    # completion lengths change every RL batch and must not trigger a new search.
    return triton.autotune(
        _TUNING_CONFIGS, key=["V", "HAS_LABELS", "HAS_MASK"], restore_value=list(restore)
    )(kernel)


def _launch(kernel, n_rows: int, V: int, element_size: int, block_v: int | None, *args, **meta):
    if block_v is None and _autotune_enabled():
        # The backward may write its gradient over the logits it reads: restore them
        # between tuning runs.
        restore = ("logits_ptr",) if kernel is _entropy_bwd_kernel else ()
        _tuned(kernel, restore)[(n_rows,)](*args, **meta)
        return
    block = block_v or _block_v(V, element_size)
    kernel[(n_rows,)](*args, **meta, BLOCK_V=block, num_warps=_num_warps(block))


def lse_from_stats(stats: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """Log-sum-exp of ``logits / T`` from the forward's ``stats [..., 2]``."""
    return stats[..., 0] * inv_temperature + stats[..., 1]


def _rows_view(logits: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` as a 3-D view ``[outer, inner, V]`` without copying when the
    leading dims allow it (plain ``[B, T, V]`` slices such as ``logits[:, :-1]`` always do)."""
    V = logits.shape[-1]
    if logits.dim() == 1:
        return logits.view(1, 1, V)
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    if logits.dim() == 3:
        return logits
    try:
        return logits.view(-1, logits.shape[-2], V)
    except RuntimeError:  # leading dims that cannot be merged: one copy of the logits
        return logits.reshape(-1, logits.shape[-2], V)


def _flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # Per-row tensors are indexed with stride 1 in the kernels; autograd hands over
    # expanded (stride-0) gradients, so materialise them.
    return None if tensor is None else tensor.reshape(-1).contiguous()


def entropy_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel on ``logits [..., V]``.

    Returns ``(entropy, logprobs or None, stats)``: float32 shaped like the token dims, and
    ``stats [..., 2]`` = (row max of the raw logits, log-sum-exp of ``(x - max) / T``), what the
    backward needs (see :func:`lse_from_stats`). ``block_v`` overrides the vocabulary block
    (tests use it to cross block edges).
    """
    token_shape = logits.shape[:-1]
    V = logits.shape[-1]
    view = _rows_view(logits)
    n_rows = view.shape[0] * view.shape[1]
    entropy = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    logprobs = torch.empty_like(entropy) if labels is not None else None
    if n_rows:
        mask_flat = _flat(mask)
        _launch(
            _entropy_fwd_kernel,
            n_rows,
            V,
            logits.element_size(),
            block_v,
            view,
            _flat(labels),
            None if mask_flat is None else mask_flat.view(torch.uint8),
            entropy,
            logprobs,
            stats,
            view.shape[1],
            view.stride(0),
            view.stride(1),
            view.stride(2),
            V,
            inv_temperature,
            HAS_LABELS=labels is not None,
            HAS_MASK=mask is not None,
        )
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
) -> torch.Tensor:
    """Launch the backward kernel: gradient of ``sum(g_H * H + g_logp * logp)`` w.r.t. the
    logits, written in the logits' dtype into ``out`` (a new contiguous tensor if None;
    ``out`` may be ``logits`` itself, since every row is read before it is written)."""
    V = logits.shape[-1]
    view = _rows_view(logits)
    n_rows = view.shape[0] * view.shape[1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    elif not out.is_contiguous() or out.shape != logits.shape:
        raise ValueError("out must be a contiguous tensor shaped like logits")
    grad_rows = out.view(n_rows, V)
    if n_rows:
        mask_flat = _flat(mask)
        _launch(
            _entropy_bwd_kernel,
            n_rows,
            V,
            logits.element_size(),
            block_v,
            view,
            _flat(labels),
            None if mask_flat is None else mask_flat.view(torch.uint8),
            _flat(entropy),
            _flat(stats),
            _flat(grad_entropy),
            _flat(grad_logprobs),
            grad_rows,
            view.shape[1],
            view.stride(0),
            view.stride(1),
            view.stride(2),
            grad_rows.stride(0),
            V,
            inv_temperature,
            HAS_LABELS=labels is not None,
            HAS_MASK=mask is not None,
        )
    return out
