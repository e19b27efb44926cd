"""Linear entropy on the fused Triton kernels (``kernels.linear_entropy``): the logits never
leave the GEMM's registers except for a bounded chunk that a backward reads back. Plain
tensors, no autograd.

GEMMs (each ``2 * rows * D * V`` FLOPs) per path:

* forward only: 1 (the fused forward);
* training (gradients to ``hidden`` and the lm_head): the forward keeps the logits of the
  first ``keep`` rows (one chunk budget), so their backward is the gradient pass over the kept
  logits plus ``grad_hidden`` and ``grad_weight`` (cuBLAS): 3 GEMMs; rows beyond the budget
  are recomputed (a 4th GEMM for those rows only); the loss head (``_token_loss_paths``)
  forms each chunk's gradient in the forward: 3 GEMMs for every row;
* the entropy attack (frozen lm_head, gradient to ``hidden``): per chunk, the forward keeps
  the chunk's logits, ``dH/dlogits`` is written over them, and ``dH/dhidden`` is one cuBLAS
  GEMM: 2 GEMMs, and the backward is a per-row scaling.
"""

from __future__ import annotations

import torch

from saei_fast.ops._linear_chunks import chunks


def default_chunk_rows(vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk of the fused paths (kept logits, gradient chunks): the kernels' own
    choice, the one ``benchmark_plans`` reports."""
    from saei_fast.kernels._linear_config import chunk_rows, gemm_config
    from saei_fast.kernels.plan import target_for

    return chunk_rows(dtype, vocab_size, gemm_config(target_for(device), dtype).block_n)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    rows: torch.Tensor | None,
    inv_temperature: float,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(entropy, logprobs or None, stats, kept)``: ``kept [keep, V]`` holds the logits of the
    first ``keep`` computed rows (None when ``keep`` is 0)."""
    from saei_fast.kernels.linear_entropy import linear_entropy_fwd

    kept = None
    if keep:
        kept = torch.empty(keep, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    entropy, logprobs, stats = linear_entropy_fwd(
        hidden, weight, bias, rows, labels, inv_temperature, logits_out=kept
    )
    return entropy, logprobs, stats, kept


def grad_logits(
    hidden, weight, bias, rows, start, labels, entropy, stats, g_h, g_lp, inv_t, out, from_logits
) -> torch.Tensor:
    """The gradient w.r.t. the logits of ``out.shape[0]`` rows from position ``start`` of
    ``rows``, written into ``out`` (which holds their kept logits when ``from_logits``)."""
    from saei_fast.kernels.linear_entropy import linear_entropy_grad_logits

    return linear_entropy_grad_logits(
        hidden,
        weight,
        bias,
        rows,
        start,
        labels,
        entropy,
        stats,
        g_h,
        g_lp,
        inv_t,
        out,
        from_logits=from_logits,
    )


def entropy_with_input_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    inv_temperature: float,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropy [N], dH/dhidden [N, D])`` of a frozen lm_head: per chunk, the fused forward
    keeps the chunk's logits, the gradient pass turns them into ``dH/dlogits`` in place and
    one GEMM gives ``dH/dhidden``."""
    from saei_fast.kernels.linear_entropy import linear_entropy_fwd

    N, V = hidden.shape[0], weight.shape[0]
    entropy = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    make = torch.empty if rows is None else torch.zeros
    input_grad = make(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    n_rows = N if rows is None else rows.numel()
    if n_rows == 0:
        return entropy, input_grad
    chunk_rows = min(chunk_rows, n_rows)
    buffer = torch.empty(chunk_rows, V, dtype=hidden.dtype, device=hidden.device)
    ones = torch.ones(N, dtype=torch.float32, device=hidden.device)
    for _, index in chunks(n_rows, rows, chunk_rows):
        if rows is None:
            # A view of the chunk's rows: the kernels index it from 0.
            part, part_rows, count = hidden[index], None, index.stop - index.start
        else:
            part, part_rows, count = hidden, index, index.numel()
        logits = buffer[:count]
        h, _, stats = linear_entropy_fwd(
            part, weight, bias, part_rows, None, inv_temperature, logits_out=logits
        )
        grad_logits(
            part, weight, bias, part_rows, 0, None, h, stats, ones, None, inv_temperature,
            logits, True,
        )  # fmt: skip
        entropy[index] = h if rows is None else h[index]
        input_grad[index] = torch.mm(logits, weight)
    return entropy, input_grad
