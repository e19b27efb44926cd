"""The entropy op's memory-light PyTorch path: entropy and log-probs from logits (CPU, and
float64 anywhere).

Two implementations of the same math, chosen per call:

- compiled (``compiled``, the default on a CPU): the per-row math compiled by Inductor
  into one parallel loop over all rows, reading each logit once per pass and allocating no
  ``[N, V]`` temporary;
- eager (the fallback: float64, CUDA tensors under ``impl="torch"``, layouts whose leading
  dims do not flatten, ``SAEI_CPU_COMPILE=0``, or no working compiler): rows in chunks of
  about ``CHUNK_ELEMENTS`` logits, so the extra memory is a few chunk-sized float32 buffers
  whatever N x V is, each chunk warm in cache across the passes over it.

The math matches the Triton kernels: everything is computed relative to the row maximum, so
``H = log s - E[z - m]`` never subtracts two large numbers. A label outside ``[0, V)`` (which
only reaches here under ``torch.compile``, where the host range check is skipped) gives a NaN
log-prob. In the backward, a row that is masked or whose upstream gradients are all 0
contributes exactly 0, whatever its logits hold.

The ``rows_*`` functions work on one ``[c, V]`` block of rows; the fused linear-entropy op
reuses them on its chunks of logits.
"""

from __future__ import annotations

import math

import torch

from saei_fast.ops.entropy import compiled

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


def _rows_view(logits: torch.Tensor) -> torch.Tensor | None:
    """``logits`` as a ``[n, V]`` view without copying, or None when its leading dims do not
    flatten into one strided dim (e.g. ``logits[:, :-1]`` of a contiguous ``[B, L, V]``)."""
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return None


def rows_forward(
    x: torch.Tensor, labels: torch.Tensor | None, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Entropy, label log-prob and statistics of each row of logits ``x [c, V]``.

    ``x`` holds raw logits in the accumulation dtype and may be overwritten (it must be a
    buffer the caller owns). Returns ``(entropy, logprobs or None, stats [c, 2])`` with
    ``stats = (row max of x, log sum exp((x - max) / T))``, as the Triton kernel does.
    A row of only ``-inf`` gives NaN; a label outside ``[0, V)`` a NaN log-prob.
    """
    if compiled.usable(x):
        n = x.shape[0]
        chunk_labels = labels if labels is not None else x.new_zeros(n, dtype=torch.long)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        out = compiled.forward(x, chunk_labels, active, inv_temperature)
        if out is not None:
            entropy, logprobs, stats = out
            return entropy, logprobs if labels is not None else None, stats
    return _eager_rows_forward(x, labels, inv_temperature)


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
    (raw logits in the accumulation dtype; may be overwritten), given the forward's
    ``stats``. Without ``labels`` the one-hot term ``g_logp / T`` at the label is left to
    the caller. Rows whose upstream gradients are all 0 get exactly 0."""
    if compiled.usable(x):
        n = x.shape[0]
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        no_label = torch.full((n,), -1, dtype=torch.long, device=x.device)
        g_lp = grad_logprobs if grad_logprobs is not None else torch.zeros_like(grad_entropy)
        grad = compiled.backward(
            x,
            labels if labels is not None else no_label,
            active,
            entropy,
            stats,
            grad_entropy,
            g_lp,
            inv_temperature,
        )
        if grad is not None:
            return grad
    return _eager_rows_backward(
        x, stats, entropy, grad_entropy, grad_logprobs, labels, inv_temperature
    )


# -------------------------------------------------------------------------------------------
# Eager per-block math (the fallback)
# -------------------------------------------------------------------------------------------


def _owned_labels(labels: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels clamped into ``[0, V)`` for gathers, and where they really were in range."""
    in_range = (labels >= 0) & (labels < vocab_size)
    return labels.clamp(0, vocab_size - 1).long(), in_range


def _live_rows(grad_entropy: torch.Tensor, grad_logprobs: torch.Tensor | None) -> torch.Tensor:
    """Rows with a nonzero upstream gradient; the others are treated as masked."""
    live = grad_entropy != 0
    return live if grad_logprobs is None else live | (grad_logprobs != 0)


def _eager_rows_forward(
    x: torch.Tensor, labels: torch.Tensor | None, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
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
        safe_labels, in_range = _owned_labels(labels, x.shape[-1])
        picked = d.gather(1, safe_labels.unsqueeze(1)).squeeze(1) - log_total
        logprobs = torch.where(in_range, picked, torch.nan)
    d.clamp_(min=_log_smallest(d.dtype))
    # sum() reduces pairwise; a BLAS dot (bmm) accumulates serially and loses ~1e-4 at V=32k.
    mean_d = unnormalised.mul_(d).sum(dim=-1) / total
    entropy = log_total - mean_d
    return entropy, logprobs, torch.stack([row_max.squeeze(1), log_total], dim=1)


def _eager_rows_backward(
    x: torch.Tensor,
    stats: torch.Tensor,
    entropy: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    labels: torch.Tensor | None,
    inv_temperature: float,
) -> torch.Tensor:
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
        safe_labels, in_range = _owned_labels(labels, x.shape[-1])
        onehot = torch.where(in_range, grad_logprobs * inv_temperature, 0.0)
        grad.scatter_add_(1, safe_labels.unsqueeze(1), onehot.unsqueeze(1).to(grad.dtype))
    dead = ~_live_rows(grad_entropy, grad_logprobs)
    if dead.any():
        grad[dead] = 0.0
    return grad


def _row_chunks(rows: torch.Tensor, vocab_size: int) -> list[torch.Tensor]:
    """The flat indices ``rows`` in chunks of about ``CHUNK_ELEMENTS`` logits."""
    return list(rows.split(max(1, CHUNK_ELEMENTS // max(1, vocab_size))))


def _selected_rows(n_rows: int, keep: torch.Tensor | None, device) -> torch.Tensor:
    if keep is None:
        return torch.arange(n_rows, device=device)
    return keep.reshape(-1).nonzero().squeeze(1)


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


# -------------------------------------------------------------------------------------------
# Whole tensors: the custom op's forward and backward on the PyTorch path
# -------------------------------------------------------------------------------------------


def entropy_forward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(entropy, logprobs or None, stats [..., 2])`` for ``logits [..., V]`` (see
    :func:`rows_forward`); masked rows give 0."""
    token_shape = logits.shape[:-1]
    reshape = lambda t: None if t is None else t.view(token_shape)
    rows_view = _rows_view(logits)
    if rows_view is not None and compiled.usable(rows_view):
        n = rows_view.shape[0]
        flat_labels = labels.reshape(-1) if labels is not None else None
        if flat_labels is None:
            flat_labels = torch.zeros(n, dtype=torch.long, device=logits.device)
        active = mask.reshape(-1) if mask is not None else None
        if active is None:
            active = torch.ones(n, dtype=torch.bool, device=logits.device)
        out = compiled.forward(rows_view, flat_labels, active, inv_temperature)
        if out is not None:
            entropy, logprobs, stats = out
            logprobs = logprobs if labels is not None else None
            return reshape(entropy), reshape(logprobs), stats.view(*token_shape, 2)
    return _eager_entropy_forward(logits, labels, mask, inv_temperature)


def _eager_entropy_forward(logits, labels, mask, inv_temperature):
    token_shape = logits.shape[:-1]
    acc = accumulation_dtype(logits.dtype)
    n_rows = math.prod(token_shape)
    entropy = torch.zeros(n_rows, dtype=acc, device=logits.device)
    stats = torch.zeros(n_rows, 2, dtype=acc, device=logits.device)
    logprobs = torch.zeros_like(entropy) if labels is not None else None
    flat_labels = None if labels is None else labels.reshape(-1)
    selected = _selected_rows(n_rows, mask, logits.device)
    for rows in _row_chunks(selected, logits.shape[-1]):
        x = _gather_rows(logits, rows)
        chunk_labels = None if flat_labels is None else flat_labels[rows]
        h, lp, chunk_stats = _eager_rows_forward(x, chunk_labels, inv_temperature)
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
    """Gradient w.r.t. ``logits`` (contiguous, logits' dtype); masked rows, and rows whose
    upstream gradients are all 0, get exactly 0."""
    V = logits.shape[-1]
    acc = accumulation_dtype(logits.dtype)
    flat = lambda t: None if t is None else t.reshape(-1)
    entropy, grad_entropy = flat(entropy), flat(grad_entropy).to(acc)
    stats = stats.reshape(-1, 2)
    grad_logprobs, labels, mask = flat(grad_logprobs), flat(labels), flat(mask)
    if grad_logprobs is not None:
        grad_logprobs = grad_logprobs.to(acc)
    rows_view = _rows_view(logits)
    if rows_view is not None and compiled.usable(rows_view):
        n = rows_view.shape[0]
        active = mask if mask is not None else torch.ones(n, dtype=torch.bool)
        grad = compiled.backward(
            rows_view,
            labels if labels is not None else torch.full((n,), -1, dtype=torch.long),
            active,
            entropy,
            stats,
            grad_entropy,
            grad_logprobs if grad_logprobs is not None else torch.zeros_like(grad_entropy),
            inv_temperature,
        )
        if grad is not None:
            return grad.view(logits.shape)
    live = _live_rows(grad_entropy, grad_logprobs)
    keep = live if mask is None else live & mask
    all_live = mask is None and bool(live.all())
    grad = (torch.empty if all_live else torch.zeros)(
        logits.shape, dtype=logits.dtype, device=logits.device
    )
    grad_rows = grad.view(-1, V)
    for rows in _row_chunks(_selected_rows(keep.numel(), keep, logits.device), V):
        x = _gather_rows(logits, rows)
        block = _eager_rows_backward(
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
