"""The linear-entropy op's PyTorch path: chunks of materialised logits (CPU, float64). Plain
tensors, no autograd. The same loop serves the chunked Triton variant (``impl ==
"triton_chunked"``, kept for benchmarks): cuBLAS logits per chunk, turned into statistics
and gradients by the entropy-from-logits kernels (``triton_path.chunk_*``).

Each chunk's logits come from one GEMM in the input dtype (as ``F.linear`` returns them) and
are turned into statistics in the accumulation dtype; the backward recomputes them and turns
them into the gradient w.r.t. the logits.
"""

from __future__ import annotations

import torch

from saei_fast.ops.entropy import compiled as entropy_compiled
from saei_fast.ops.entropy import torch_path as entropy_torch
from saei_fast.ops.linear_entropy import triton_path
from saei_fast.ops.linear_entropy.chunks import chunk_logits, chunks, owned_labels


def _acc_logits(logits: torch.Tensor) -> torch.Tensor:
    """A fresh chunk of logits in the accumulation dtype, a buffer the caller may overwrite
    (no copy when the GEMM already produced it in that dtype)."""
    return logits.to(entropy_torch.accumulation_dtype(logits.dtype))


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    rows: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(entropy, logprobs or None, stats)`` of the rows ``rows`` (None: all), chunk by chunk;
    rows not computed give 0. ``impl`` is ``"torch"`` or ``"triton_chunked"``."""
    N = hidden.shape[0]
    acc = entropy_torch.accumulation_dtype(hidden.dtype)
    entropy = torch.zeros(N, dtype=acc, device=hidden.device)
    stats = torch.zeros(N, 2, dtype=acc, device=hidden.device)
    logprobs = torch.zeros_like(entropy) if labels is not None else None
    n_rows = N if rows is None else rows.numel()
    for _, index in chunks(n_rows, rows, chunk_rows):
        chunk_labels = None if labels is None else labels[index]
        h, lp, chunk_stats = chunk_forward(
            impl, chunk_logits(hidden[index], weight, bias), chunk_labels, inv_temperature
        )
        entropy[index] = h
        stats[index] = chunk_stats
        if logprobs is not None:
            logprobs[index] = lp
    return entropy, logprobs, stats


def chunk_forward(
    impl: str, logits: torch.Tensor, labels: torch.Tensor | None, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(entropy, logprobs or None, stats)`` of one chunk of logits ``[c, V]`` (the GEMM's
    output, which this may overwrite). A label outside ``[0, V)`` gives a NaN log-prob."""
    if impl == "triton_chunked":
        return triton_path.chunk_stats(logits, labels, inv_temperature)
    # A 16-bit chunk and its fp32 copy are alive together: the chunk budget counts both.
    x = _acc_logits(logits)
    safe_labels = in_range = None
    if labels is not None:
        safe_labels, in_range = owned_labels(labels, x.shape[1])
    h, lp, stats = entropy_torch.rows_forward(x, safe_labels, inv_temperature)
    if lp is not None:
        lp = torch.where(in_range, lp, torch.nan)
    return h, lp, stats


def grad_logits_chunk(
    impl, hidden, weight, bias, index, labels, entropy, stats, g_h, g_lp, inv_t
) -> torch.Tensor:
    """The gradient w.r.t. the recomputed logits of the rows ``index``, ``[c, V]`` in the
    weight's dtype."""
    return chunk_grad_logits(
        impl,
        chunk_logits(hidden[index], weight, bias),
        None if labels is None else labels[index],
        entropy[index],
        stats[index],
        g_h[index],
        None if g_lp is None else g_lp[index],
        inv_t,
    )


def chunk_grad_logits(impl, logits, labels, entropy, stats, g_h, g_lp, inv_t) -> torch.Tensor:
    """The gradient of ``sum(g_h * H + g_lp * logp)`` w.r.t. one chunk of logits ``[c, V]``
    (the GEMM's output, consumed), given the chunk's forward ``entropy`` and ``stats``; in
    the logits' dtype. Labels outside ``[0, V)`` contribute no one-hot term."""
    if impl == "triton_chunked":
        # In place: the chunk's logits become their gradient.
        return triton_path.chunk_grad(logits, labels, entropy, stats, g_h, g_lp, inv_t)
    dtype = logits.dtype
    x = _acc_logits(logits)
    grad = entropy_torch.rows_backward(x, stats, entropy, g_h, g_lp, None, inv_t)
    if labels is not None:
        # The one-hot term, only for labels this weight owns (see custom_ops.linear_forward).
        safe_labels, in_range = owned_labels(labels, grad.shape[1])
        onehot = torch.where(in_range, g_lp * inv_t, 0.0)
        grad.scatter_add_(1, safe_labels.unsqueeze(1), onehot.unsqueeze(1))
    return grad.to(dtype)


def _entropy_and_logits_grad(x: torch.Tensor, scratch: torch.Tensor, inv_temperature: float):
    """Entropy of each row of raw logits ``x [c, V]`` (accumulation dtype), and ``dH/dx``
    written over ``x``; ``scratch`` is a second ``[c, V]`` buffer. Two buffers in all.

    Same statistics as the entropy op's ``torch_path.rows_forward`` (shift by the row max
    before scaling by ``1/T``), then ``dH/dx = p * (-log p - H) / T = (e / s) * (w / s - d) / T``
    with ``d = (x - max) / T``, ``e = exp(d)``, ``s = sum e``, ``w = sum e * d``.
    """
    if entropy_compiled.usable(x):
        # One compiled loop per row block instead of the passes below (issue of OpenMP
        # regions on a busy CPU); None when compilation is unavailable.
        fused = entropy_compiled.entropy_and_grad(x, inv_temperature)
        if fused is not None:
            return fused
    d = x.sub_(x.amax(dim=1, keepdim=True))
    if inv_temperature != 1.0:
        d.mul_(inv_temperature)
    e = torch.exp(d, out=scratch)
    total = e.sum(dim=1, keepdim=True)
    # Clamp -inf logits to a finite value whose exp is already 0, so that 0 * (-inf) never
    # appears below (see the entropy op's torch_path._log_smallest).
    d.clamp_(min=entropy_torch._log_smallest(d.dtype))
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


def entropy_with_input_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    inv_temperature: float,
    impl: str,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropy [N], dH/dhidden [N, D])`` of a frozen lm_head, chunk by chunk: each chunk's
    logits are turned into ``dH/dlogits`` while they are in memory, then
    ``dH/dhidden = dH/dlogits @ weight``. Two GEMMs; the chunk buffers are allocated once."""
    N, V = hidden.shape[0], weight.shape[0]
    acc = entropy_torch.accumulation_dtype(hidden.dtype)
    entropy = torch.zeros(N, dtype=acc, device=hidden.device)
    make = torch.empty if rows is None else torch.zeros
    input_grad = make(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    n_rows = N if rows is None else rows.numel()
    if n_rows == 0:
        return entropy, input_grad
    chunk_rows = min(chunk_rows, n_rows)
    if impl == "torch":
        buffers = torch.empty(2, chunk_rows, V, dtype=acc, device=hidden.device)
    else:
        buffers = torch.empty(1, chunk_rows, V, dtype=hidden.dtype, device=hidden.device)
    for _, index in chunks(n_rows, rows, chunk_rows):
        hidden_chunk = hidden[index]
        logits = buffers[0, : hidden_chunk.shape[0]]
        if hidden.dtype == logits.dtype:
            if bias is None:
                torch.mm(hidden_chunk, weight.t(), out=logits)
            else:
                torch.addmm(bias, hidden_chunk, weight.t(), out=logits)
        else:
            logits.copy_(chunk_logits(hidden_chunk, weight, bias))
        if impl == "torch":
            scratch = buffers[1, : hidden_chunk.shape[0]]
            h, grad_logits = _entropy_and_logits_grad(logits, scratch, inv_temperature)
            grad_logits = grad_logits.to(weight.dtype)
        else:
            # In place: the chunk's logits become dH/dlogits.
            h, grad_logits = triton_path.chunk_entropy_and_grad(logits, inv_temperature)
        entropy[index] = h
        input_grad[index] = torch.mm(grad_logits, weight)
    return entropy, input_grad
