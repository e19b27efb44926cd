"""Differentiable public ops: autograd + dispatch (Triton on CUDA, PyTorch on CPU)."""

from saei_fast.ops.band import band_entropy_objective, entropy_band_mask
from saei_fast.ops.entropy import entropy, logprobs_and_entropy
from saei_fast.ops.linear_entropy import linear_entropy, linear_logprobs_and_entropy
from saei_fast.ops.linear_loss import linear_token_loss

__all__ = [
    "band_entropy_objective",
    "entropy",
    "entropy_band_mask",
    "linear_entropy",
    "linear_logprobs_and_entropy",
    "linear_token_loss",
    "logprobs_and_entropy",
]
