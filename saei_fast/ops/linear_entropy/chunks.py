"""Pieces shared by every linear-entropy path and by the loss head (plain tensors, no
autograd): chunk sizing, the rows a pass computes, and a chunk's logits.

Only chunks of rows are ever turned into ``[c, V]`` logits (or their gradient). The chunk
holds ``c = budget // bytes_per_row`` rows: ``budget`` is ``CUDA_CHUNK_BYTES`` (1 GiB) on
CUDA and ``CPU_CHUNK_BYTES`` (256 MiB) elsewhere; a row costs ``V`` elements of the input
dtype on the Triton paths (one buffer, overwritten by its gradient) and ``k * V * 4`` bytes on
the PyTorch path (``k`` = 3 fp32 buffers alive at once, 2 on the attack's path, plus a
low-precision copy for 16-bit inputs). Peak extra memory is therefore about
``budget + O(N * D)`` (plus ``[V, D]`` when the weight requires grad), whatever N is.
"""

from __future__ import annotations

import torch

from saei_fast.ops.dispatch import kernel_options
from saei_fast.ops.entropy import torch_path as entropy_torch

# Big enough that a chunk's GEMM has the ~200 rows a CPU BLAS needs for full speed at
# V = 152k, and that each buffer is above glibc's 32 MiB mmap threshold (freed buffers go
# back to the system instead of fragmenting the heap).
CPU_CHUNK_BYTES = 256 << 20
# The Triton kernels' own budget (kept logits, gradient chunks): kernels/linear_entropy.
CUDA_CHUNK_BYTES = 1 << 30


def default_chunk_rows(
    vocab_size: int, dtype: torch.dtype, device: torch.device, impl: str, acc_buffers: int = 3
) -> int:
    """Rows per chunk so that the ``[c, V]`` buffers stay within the device's budget: one in
    the input dtype on the Triton paths, ``acc_buffers`` in the accumulation dtype (plus a
    low-precision copy for 16-bit inputs) on the PyTorch path."""
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    if impl == "torch":
        acc = entropy_torch.accumulation_dtype(dtype)
        low_precision = dtype.itemsize if dtype != acc else 0
        per_row = vocab_size * (acc_buffers * acc.itemsize + low_precision)
    else:
        per_row = vocab_size * dtype.itemsize
    return max(1, budget // per_row)


def fused_chunk_rows(vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk of the fused paths (kept logits, gradient chunks): the kernels' own
    choice, the one ``benchmark_plans`` reports."""
    # Imported here: the kernels' configuration imports Triton, which the PyTorch path
    # does not need.
    from saei_fast.kernels.linear_entropy.config import chunk_rows, gemm_config

    target = kernel_options().target(device)
    return chunk_rows(dtype, vocab_size, gemm_config(target, dtype).block_n)


def chunk_rows_for(impl: str, vocab_size: int, hidden: torch.Tensor, chunk_rows: int, **kw):
    """``chunk_rows`` or, when it is 0, the default of the path."""
    if chunk_rows:
        return chunk_rows
    if impl == "triton":
        return fused_chunk_rows(vocab_size, hidden.dtype, hidden.device)
    return default_chunk_rows(vocab_size, hidden.dtype, hidden.device, impl, **kw)


def keep_rows(impl: str, hidden: torch.Tensor, vocab_size: int, chunk_rows: int) -> int:
    """Rows whose logits a training forward keeps for its backward (fused path only): one
    chunk, at most all the rows."""
    if impl != "triton":
        return 0
    return min(hidden.shape[0], chunk_rows_for(impl, vocab_size, hidden, chunk_rows))


def chunks(n_rows: int, rows: torch.Tensor | None, chunk_rows: int, start: int = 0):
    """``(start, index)`` per chunk of positions ``[start, n_rows)``: ``index`` selects the
    chunk's rows of ``hidden`` (a slice, a view, when every row is computed; else a slice of
    the selected row indices)."""
    for first in range(start, n_rows, chunk_rows):
        stop = min(n_rows, first + chunk_rows)
        yield first, slice(first, stop) if rows is None else rows[first:stop]


def selected_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the rows a pass computes (None: all of them)."""
    # One host sync on CUDA (the count is data-dependent); it pays for itself by skipping
    # the GEMM work of every masked row.
    return None if mask is None else mask.nonzero().squeeze(1)


def live_mask(
    mask: torch.Tensor | None, grad_entropy: torch.Tensor, grad_logprobs: torch.Tensor | None
) -> torch.Tensor:
    """Rows the backward computes: unmasked, with a nonzero upstream gradient. A row whose
    upstream gradients are all 0 is treated as masked: it contributes exactly 0 to every
    gradient, even when its hidden state (so its logits) is not finite."""
    live = grad_entropy != 0
    if grad_logprobs is not None:
        live |= grad_logprobs != 0
    return live if mask is None else live & mask


def chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``[c, V]`` logits in the input dtype (fp32 accumulation inside the GEMM)."""
    if bias is None:
        return torch.mm(hidden_chunk, weight.t())
    return torch.addmm(bias, hidden_chunk, weight.t())


def owned_labels(labels: torch.Tensor, vocab_size: int):
    """Labels clamped into ``[0, V)`` for gathers, and where they really were in range."""
    in_range = (labels >= 0) & (labels < vocab_size)
    return labels.clamp(0, vocab_size - 1).long(), in_range
