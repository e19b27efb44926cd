"""The entropy op's Triton path on the host: the custom op's forward and backward launch the
kernels of ``saei_fast.kernels.entropy`` with the options the dispatch reads now
(``saei_fast.ops.dispatch.kernel_options``).

Same signatures and results as ``torch_path.entropy_forward`` / ``entropy_backward``. The
launchers are imported inside the functions: importing them imports Triton, which the
package does not need on its PyTorch path.
"""

from __future__ import annotations

import torch

from saei_fast.ops.dispatch import kernel_options


def entropy_forward(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(entropy, logprobs or None, stats [..., 2])`` for ``logits [..., V]``, float32;
    masked rows give 0 (see ``saei_fast.kernels.entropy.launch.entropy_fwd``)."""
    from saei_fast.kernels.entropy.launch import entropy_fwd

    return entropy_fwd(logits, labels, mask, inv_temperature, options=kernel_options())


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
    upstream gradients are all 0, get exactly 0 (see
    ``saei_fast.kernels.entropy.launch.entropy_bwd``)."""
    from saei_fast.kernels.entropy.launch import entropy_bwd

    return entropy_bwd(
        logits,
        labels,
        mask,
        entropy,
        stats,
        grad_entropy,
        grad_logprobs,
        inv_temperature,
        options=kernel_options(),
    )
