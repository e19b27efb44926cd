"""The linear-entropy op's Triton path on the host: plain tensors, no autograd. The fused
kernels (``saei_fast.kernels.linear_entropy``) keep the logits in the GEMM's registers except
for a bounded chunk that a backward reads back; the chunked variant (kept for benchmarks)
turns cuBLAS chunks of logits into statistics with the entropy-from-logits kernels
(``saei_fast.kernels.entropy``), its loop being the PyTorch path's (``torch_path``).

Every launch gets the options the dispatch reads now (``saei_fast.ops.dispatch
.kernel_options``), and this is where the forward is chosen: the opt-in TMA forward
(``SAEI_LINEAR_TMA=1``, sm_90) or the default one (:func:`fused_forward`, shared with the loss
head). The launchers are imported inside the functions: importing them imports Triton, which
the package does not need on its PyTorch path.

GEMMs (each ``2 * rows * D * V`` FLOPs) per path:

* forward only: 1 (the fused forward);
* training (gradients to ``hidden`` and the lm_head): the forward keeps the logits of the
  first ``keep`` rows (one chunk budget), so their backward is the gradient pass over the kept
  logits plus ``grad_hidden`` and ``grad_weight`` (cuBLAS): 3 GEMMs; rows beyond the budget
  are recomputed (a 4th GEMM for those rows only); the loss head (``ops/linear_loss``) forms
  each chunk's gradient in the forward: 3 GEMMs for every row;
* the entropy attack (frozen lm_head, gradient to ``hidden``): per chunk, the forward keeps
  the chunk's logits, ``dH/dlogits`` is written over them, and ``dH/dhidden`` is one cuBLAS
  GEMM: 2 GEMMs, and the backward is a per-row scaling.
"""

from __future__ import annotations

import torch

from saei_fast.ops.dispatch import kernel_options
from saei_fast.ops.linear_entropy.chunks import chunks


def fused_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    labels: torch.Tensor | None,
    inv_temperature: float,
    logits_out: torch.Tensor | None = None,
    **launch: tuple[int, int, int] | int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(entropy, logprobs or None, stats)`` from the fused forward the options choose: the
    TMA one when ``SAEI_LINEAR_TMA=1`` asks for it and the weight is TMA-describable (an error
    off sm_90), else the default one. Same arguments and results as
    ``saei_fast.kernels.linear_entropy.launch.linear_entropy_fwd``; ``launch`` passes its
    ``blocks`` / ``num_splits`` overrides on (tests cross tile edges with them)."""
    options = kernel_options()
    if options.linear_tma:
        # Imported only when asked for: it needs Triton's host tensor descriptors.
        from saei_fast.kernels.linear_entropy import tma

        if tma.tma_selected(hidden, weight, options):
            return tma.linear_entropy_tma_fwd(
                hidden, weight, bias, rows, labels, inv_temperature,
                logits_out=logits_out, options=options, **launch,
            )  # fmt: skip
    from saei_fast.kernels.linear_entropy.launch import linear_entropy_fwd

    return linear_entropy_fwd(
        hidden, weight, bias, rows, labels, inv_temperature,
        logits_out=logits_out, options=options, **launch,
    )  # fmt: skip


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
    kept = None
    if keep:
        kept = torch.empty(keep, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    entropy, logprobs, stats = fused_forward(
        hidden, weight, bias, rows, labels, inv_temperature, logits_out=kept
    )
    return entropy, logprobs, stats, kept


def grad_logits(
    hidden, weight, bias, rows, start, labels, entropy, stats, g_h, g_lp, inv_t, out, from_logits
) -> torch.Tensor:
    """The gradient w.r.t. the logits of ``out.shape[0]`` rows from position ``start`` of
    ``rows``, written into ``out`` (which holds their kept logits when ``from_logits``)."""
    from saei_fast.kernels.linear_entropy.launch import linear_entropy_grad_logits

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
        options=kernel_options(),
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
        h, _, stats = fused_forward(
            part, weight, bias, part_rows, None, inv_temperature, logits_out=logits
        )
        grad_logits(
            part, weight, bias, part_rows, 0, None, h, stats, ones, None, inv_temperature,
            logits, True,
        )  # fmt: skip
        entropy[index] = h if rows is None else h[index]
        input_grad[index] = torch.mm(logits, weight)
    return entropy, input_grad


# -------------------------------------------------------------------------------------------
# The chunked variant: the entropy-from-logits kernels on one chunk of materialised logits
# -------------------------------------------------------------------------------------------


def chunk_stats(
    logits: torch.Tensor, labels: torch.Tensor | None, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(entropy, logprobs or None, stats)`` of one chunk of logits ``[c, V]``."""
    from saei_fast.kernels.entropy.launch import entropy_fwd

    return entropy_fwd(logits, labels, None, inv_temperature, options=kernel_options())


def chunk_grad(logits, labels, entropy, stats, g_h, g_lp, inv_t) -> torch.Tensor:
    """The gradient of ``sum(g_h * H + g_lp * logp)`` w.r.t. one chunk of logits, written
    over them (in place: the chunk's logits become their gradient)."""
    from saei_fast.kernels.entropy.launch import entropy_bwd

    return entropy_bwd(
        logits, labels, None, entropy, stats, g_h, g_lp, inv_t, out=logits,
        options=kernel_options(),
    )  # fmt: skip


def chunk_entropy_and_grad(
    logits: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy of each row of one chunk of logits, and ``dH/dlogits`` written over them."""
    h, _, stats = chunk_stats(logits, None, inv_temperature)
    ones = torch.ones_like(h)
    return h, chunk_grad(logits, None, h, stats, ones, None, inv_temperature)
