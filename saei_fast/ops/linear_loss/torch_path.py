"""The loss head's PyTorch path, one chunk of rows at a time: the chunk's logits (one GEMM,
kept for the gradient), their statistics, and the gradient w.r.t. them, by the linear
entropy op's chunk functions (``saei_fast.ops.linear_entropy.torch_path``: the PyTorch path,
and the chunked Triton variant ``"triton_chunked"``). Plain tensors, no autograd.
"""

from __future__ import annotations

import torch

from saei_fast.ops.entropy import torch_path as entropy_torch
from saei_fast.ops.linear_entropy import torch_path as linear_torch
from saei_fast.ops.linear_entropy.chunks import chunk_logits


def chunk_stats_and_logits(
    impl: str,
    part: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    inv_t: float,
    keep: bool,
):
    """``(entropy, logprobs or None, stats, logits or None)`` of the chunk of rows ``part``;
    ``logits`` (kept for the gradient) only when ``keep``."""
    logits = chunk_logits(part, weight, bias)
    # The PyTorch statistics overwrite their fp32 copy of the chunk, which is the chunk
    # itself when the GEMM already gave fp32: keep a copy for the gradient then (a 16-bit
    # chunk is copied to fp32 by the statistics anyway).
    acc = entropy_torch.accumulation_dtype(logits.dtype)
    source = logits.clone() if keep and impl == "torch" and logits.dtype == acc else logits
    h, lp, stats = linear_torch.chunk_forward(impl, source, labels, inv_t)
    return h, lp, stats, logits if keep else None


def chunk_grad_logits(impl, logits, labels, h, stats, g_h, g_lp, inv_t) -> torch.Tensor:
    """``dL/dlogits`` of the chunk (its kept ``logits`` consumed), in the logits' dtype."""
    return linear_torch.chunk_grad_logits(impl, logits, labels, h, stats, g_h, g_lp, inv_t)
