"""The loss head's Triton path, one chunk of rows at a time: the linear-entropy op's fused
forward keeps the chunk's logits (``saei_fast.ops.linear_entropy.triton_path.fused_forward``,
which also chooses the opt-in TMA forward), and its gradient pass writes ``dL/dlogits`` over
them. The loss head has no kernels of its own. Plain tensors, no autograd.
"""

from __future__ import annotations

import torch

from saei_fast.ops.linear_entropy.triton_path import fused_forward, grad_logits


def chunk_stats_and_logits(
    part: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    inv_t: float,
    logits: torch.Tensor | None,
):
    """``(entropy, logprobs or None, stats, logits)`` of the chunk of rows ``part``
    (contiguous ``[c, D]``); its logits are kept in ``logits`` (``[c, V]``) unless None."""
    h, lp, stats = fused_forward(part, weight, bias, None, labels, inv_t, logits_out=logits)
    return h, lp, stats, logits


def chunk_grad_logits(part, weight, bias, logits, labels, h, stats, g_h, g_lp, inv_t):
    """``dL/dlogits`` of the chunk, written over its kept ``logits``."""
    return grad_logits(
        part, weight, bias, None, 0, labels, h, stats, g_h, g_lp, inv_t, logits, True
    )
