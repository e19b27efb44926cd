"""Memory-light PyTorch path for entropy / log-probs from logits (CPU, and float64 anywhere).

Rows are processed in chunks of about ``CHUNK_ELEMENTS`` logits, so the extra memory is a few
chunk-sized float32 buffers whatever N x V is, and each chunk stays warm in cache across the
passes over it. The math matches the Triton kernels: everything is computed relative to the
row maximum, so ``H = log s - E[z - m]`` never subtracts two large numbers.

The ``rows_*`` functions work on one ``[c, V]`` block of rows; the fused linear-entropy op
reuses them on its chunks of logits.
"""

from __future__ import annotations

import math

import torch

# ~4 MiB of float32 per buffer: large enough that per-op overhead is amortised, small
# enough that a chunk stays in the last-level cache across its passes.
CHUNK_ELEMENTS = 1 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_smallest(dtype: torch.dtype) -> float:
    # Below this, exp() is exactly 0 in `dtype`. Clamping log-probs here keeps 0 * (-inf)
    # out of the products (it would be NaN) while changing no product by more than a
    # subnormal.
    return math.log(torch.finfo(dtype).smallest_normal) - 30.0


def rows_forward(
    x: torch.Tensor, labels: torch.Tensor | None, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Entropy, label log-prob and statistics of each row of logits ``x [c, V]``.

    ``x`` holds raw logits in the accumulation dtype and is overwritten (it must be a buffer
    the caller owns). Returns ``(entropy, logprobs or None, stats [c, 2])`` with
    ``stats = (row max of x, log sum exp((x - max) / T))``, as the Triton kernel does.
    A row of only ``-inf`` gives NaN.
    """
    row_max = x.amax(dim=-1, keepdim=True)
    # Shift before scaling: (x - max) is exact for nearby logits, x / T is not.
    d = x.sub_(row_max)
    if inv_temperature != 1.0:
        d.mul_(inv_temperature)
    unnormalised = torch.exp(d)
    total = unnormalised.sum(dim=-1)
    log_total = total.log()
    logprobs = None
    if labels is not None:
        logprobs = d.gather(1, labels.long().unsqueeze(1)).squeeze(1) - log_total
    d.clamp_(min=_log_smallest(d.dtype))
    # sum() reduces pairwise; a BLAS dot (bmm) accumulates serially and loses ~1e-4 at V=32k.
    mean_d = unnormalised.mul_(d).sum(dim=-1) / total
    entropy = log_total - mean_d
    return entropy, logprobs, torch.stack([row_max.squeeze(1), log_total], dim=1)


def rows_backward(
    x: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    labels: torch.Tensor | None,
    inv_temperature: float,
) -> torch.Tensor:
    """Gradient w.r.t. the logits of ``sum(g_H * H + g_logp * logp)`` for rows ``x [c, V]``
    (raw logits in the accumulation dtype; overwritten), given the forward's ``stats``."""
    logp = x.sub_(stats[:, :1])
    if inv_temperature != 1.0:
        logp.mul_(inv_temperature)
    logp.sub_(stats[:, 1:])
    p = torch.exp(logp)
    logp.clamp_(min=_log_smallest(logp.dtype))
    # grad = p * (g_H * (-log p - H) - g_logp) / T, plus g_logp / T at the label.
    scale = grad_entropy * inv_temperature
    offset = -scale * entropy
    if grad_logprobs is not None:
        offset = offset - grad_logprobs * inv_temperature
    grad = torch.addcmul(offset.unsqueeze(1), logp, scale.unsqueeze(1), value=-1.0)
    grad.mul_(p)
    if grad_logprobs is not None and labels is not None:
        grad.scatter_add_(
            1, labels.long().unsqueeze(1), (grad_logprobs * inv_temperature).unsqueeze(1)
        )
    return grad


def _row_chunks(logits: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Flat indices of the rows to compute (the unmasked ones), in chunks."""
    n_rows = math.prod(logits.shape[:-1])
    if mask is None:
        rows = torch.arange(n_rows, device=logits.device)
    else:
        rows = mask.reshape(-1).nonzero().squeeze(1)
    chunk_rows = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    return list(rows.split(chunk_rows))


def _gather_rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``logits`` (any strides) as a fresh ``[c, V]`` buffer in the
    accumulation dtype."""
    if logits.dim() == 1:
        block = logits.unsqueeze(0).clone()
    elif logits.dim() == 2:
        block = logits[rows]  # advanced indexing: several times faster than index_select
    else:
        block = logits[torch.unravel_index(rows, logits.shape[:-1])]
    return block.to(accumulation_dtype(logits.dtype))


def entropy_forward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(entropy, logprobs or None, stats [..., 2])`` for ``logits [..., V]`` (see
    :func:`rows_forward`); masked rows give 0."""
    token_shape = logits.shape[:-1]
    acc = accumulation_dtype(logits.dtype)
    n_rows = math.prod(token_shape)
    entropy = torch.zeros(n_rows, dtype=acc, device=logits.device)
    stats = torch.zeros(n_rows, 2, dtype=acc, device=logits.device)
    logprobs = torch.zeros_like(entropy) if labels is not None else None
    flat_labels = None if labels is None else labels.reshape(-1)
    for rows in _row_chunks(logits, mask):
        x = _gather_rows(logits, rows)
        chunk_labels = None if flat_labels is None else flat_labels[rows]
        h, lp, chunk_stats = rows_forward(x, chunk_labels, inv_temperature)
        entropy[rows] = h
        stats[rows] = chunk_stats
        if logprobs is not None:
            logprobs[rows] = lp
    reshape = lambda t: None if t is None else t.view(token_shape)
    return reshape(entropy), reshape(logprobs), stats.view(*token_shape, 2)


def entropy_backward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    inv_temperature: float,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` (contiguous, logits' dtype); masked rows get exactly 0."""
    V = logits.shape[-1]
    acc = accumulation_dtype(logits.dtype)
    make = torch.empty if mask is None else torch.zeros
    grad = make(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = grad.view(-1, V)
    flat = lambda t: None if t is None else t.reshape(-1)
    entropy, grad_entropy = flat(entropy), flat(grad_entropy).to(acc)
    stats = stats.reshape(-1, 2)
    grad_logprobs, labels = flat(grad_logprobs), flat(labels)
    if grad_logprobs is not None:
        grad_logprobs = grad_logprobs.to(acc)
    for rows in _row_chunks(logits, mask):
        x = _gather_rows(logits, rows)
        block = rows_backward(
            x,
            stats[rows],
            entropy[rows],
            grad_entropy[rows],
            None if grad_logprobs is None else grad_logprobs[rows],
            None if labels is None else labels[rows],
            inv_temperature,
        )
        grad_rows.index_copy_(0, rows, block.to(logits.dtype))
    return grad
