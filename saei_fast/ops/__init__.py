"""Differentiable public ops: autograd + dispatch (Triton on CUDA, PyTorch on CPU)."""

from saei_fast.ops.entropy import entropy, logprobs_and_entropy

__all__ = ["entropy", "logprobs_and_entropy"]
