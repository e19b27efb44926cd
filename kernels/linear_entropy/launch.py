"""Launchers of the fused linear-entropy kernels (``kernels``): check the buffers, choose the
configuration (``config``), allocate the outputs and launch.

:func:`linear_entropy_fwd` gives per-row entropy, label log-probs and the statistics the
backward needs, optionally keeping the logits of the first rows; :func:`linear_entropy_grad_logits`
writes the gradient w.r.t. one chunk's logits (recomputed, or read back from the kept ones).
``forward_outputs``, ``merge_splits`` and the buffer checks are shared with the TMA forward
(``tma``). The choices that are not read from the tensors (target for CPU tensors, the
opt-in configuration search) come in as :class:`~saei_fast.kernels.plan.KernelOptions` from
the host's dispatch; which forward runs (default or TMA) is the host's choice too
(``saei_fast.ops.linear_entropy.triton_path``).
"""

from __future__ import annotations

import functools

import torch
import triton

from saei_fast.kernels.linear_entropy.config import (
    MERGE_BLOCK,
    TUNING_CONFIGS,
    config_for,
    elementwise,
    fwd_schedule,
    grad_grid,
)
from saei_fast.kernels.linear_entropy.kernels import (
    _linear_entropy_fwd_kernel,
    _linear_entropy_grad_logits_kernel,
    _merge_splits_kernel,
)
from saei_fast.kernels.plan import DEFAULT_OPTIONS, KernelOptions


@functools.cache
def _tuned(kernel):
    # Opt-in search (SAEI_AUTOTUNE=1). The key holds the shapes of the lm_head only: the
    # number of rows changes every RL batch and must not trigger a new search.
    return triton.autotune(TUNING_CONFIGS, key=["V", "D", "HAS_BIAS", "HAS_LABELS"])(kernel)


def check_blocks(blocks: tuple[int, int, int] | None) -> None:
    """Block overrides must suit ``tl.dot``."""
    if blocks is not None and any(b < 16 or b & (b - 1) for b in blocks):
        raise ValueError(f"blocks must be powers of two >= 16 (tl.dot), got {blocks}")


def check_logits_buffer(name: str, buffer: torch.Tensor, dtype: torch.dtype, V: int) -> None:
    """A ``[c, V]`` logits / gradient buffer the kernels can write row by row."""
    if buffer.dim() != 2 or buffer.shape[1] != V or buffer.stride(1) != 1:
        raise ValueError(f"{name} must be [c, {V}] with unit column stride, got {buffer.shape}")
    if buffer.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {buffer.dtype}")


def forward_outputs(hidden: torch.Tensor, rows: torch.Tensor | None, labels):
    """``(entropy, logprobs or None, stats, n_rows)``: the forward launchers' outputs, zeroed
    when only ``rows`` are computed (the others must read 0)."""
    N = hidden.shape[0]
    make = torch.zeros if rows is not None else torch.empty
    entropy = make(N, dtype=torch.float32, device=hidden.device)
    stats = make(N, 2, dtype=torch.float32, device=hidden.device)
    logprobs = make(N, dtype=torch.float32, device=hidden.device) if labels is not None else None
    return entropy, logprobs, stats, N if rows is None else rows.numel()


def merge_splits(rows, labels, parts, entropy, logprobs, stats, V: int, inv_temperature: float):
    """Merge the per-split statistics ``parts [3 or 4, splits, n_rows]`` of a forward launch
    into ``entropy`` / ``logprobs`` / ``stats``."""
    n_rows = parts.shape[2]
    _merge_splits_kernel[(triton.cdiv(n_rows, MERGE_BLOCK),)](
        rows,
        labels,
        parts[0],
        parts[1],
        parts[2],
        parts[3] if labels is not None else None,
        entropy,
        logprobs,
        stats,
        n_rows,
        parts.shape[1],
        V,
        inv_temperature,
        HAS_ROWS=rows is not None,
        HAS_LABELS=labels is not None,
        BLOCK=MERGE_BLOCK,
        num_warps=4,
    )


def linear_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    labels: torch.Tensor | None,
    inv_temperature: float,
    *,
    logits_out: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None,
    num_splits: int | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Entropy and label log-prob of ``softmax((hidden @ weight.T + bias) / T)`` per row.

    ``hidden [N, D]`` and ``weight [V, D]`` (same dtype, any strides), ``bias [V]`` or None,
    ``labels [N]`` (int, contiguous) or None, ``rows`` (int64 row indices to compute) or None
    for all. Returns ``(entropy [N], logprobs [N] or None, stats [N, 2])`` in float32 with
    ``stats = (max logit, log sum exp((x - max) / T))`` as in ``kernels/entropy``; rows not in
    ``rows`` are 0. Extra memory is ``O(N * splits)``: no ``[N, V]`` tensor is built.
    ``logits_out [k, V]`` (unit column stride, the hidden dtype), when given, receives the
    logits of the first ``k`` computed rows (positions in ``rows``), rounded to the hidden
    dtype as the statistics use them, for a backward that reads them instead of recomputing
    (``linear_entropy_grad_logits(..., from_logits=True)``).
    ``blocks = (BLOCK_N, BLOCK_V, BLOCK_D)`` and ``num_splits`` override the launch
    configuration (tests use them to cross tile and split edges); ``options`` are the host's
    (``saei_fast.ops.dispatch.kernel_options()``: the target CPU tensors choose for). This is
    the default forward; the host launches the opt-in TMA forward (``tma``) instead when
    ``options.linear_tma`` selects it.
    """
    check_blocks(blocks)
    V, D = weight.shape
    entropy, logprobs, stats, n_rows = forward_outputs(hidden, rows, labels)
    if n_rows == 0:
        return entropy, logprobs, stats

    if logits_out is not None:
        check_logits_buffer("logits_out", logits_out, hidden.dtype, V)
    target = options.target(hidden.device)
    config = config_for(target, hidden.dtype, blocks)
    schedule = fwd_schedule(target, config, n_rows, V, num_splits=num_splits)
    n_parts = 4 if labels is not None else 3
    parts = torch.empty(n_parts, schedule.splits, n_rows, device=hidden.device)
    _linear_entropy_fwd_kernel[schedule.grid](
        hidden,
        weight,
        bias,
        rows,
        labels,
        parts[0],
        parts[1],
        parts[2],
        parts[3] if labels is not None else None,
        logits_out,
        n_rows,
        0 if logits_out is None else logits_out.shape[0],
        V,
        D,
        schedule.group_rows,
        schedule.splits,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        0 if logits_out is None else logits_out.stride(0),
        inv_temperature,
        HAS_BIAS=bias is not None,
        HAS_ROWS=rows is not None,
        HAS_LABELS=labels is not None,
        STORE_LOGITS=logits_out is not None,
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        BLOCK_D=config.block_d,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    merge_splits(rows, labels, parts, entropy, logprobs, stats, V, inv_temperature)
    return entropy, logprobs, stats


def linear_entropy_grad_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    row_start: int,
    labels: torch.Tensor | None,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    inv_temperature: float,
    out: torch.Tensor,
    *,
    from_logits: bool = False,
    blocks: tuple[int, int, int] | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Gradient of ``sum(g_H * H + g_logp * logp)`` w.r.t. the logits of one chunk of rows.

    The chunk is ``out.shape[0]`` rows starting at position ``row_start`` of ``rows`` (or of
    ``hidden`` when ``rows`` is None). ``entropy``, ``stats [N, 2]`` (from the forward),
    ``grad_entropy``, ``grad_logprobs`` and ``labels`` are contiguous per-row tensors indexed
    by hidden row.
    ``out`` is a ``[c, V]`` tensor with unit column stride, written in its own dtype. With
    ``from_logits`` it holds the chunk's logits from the forward (``logits_out``) on entry
    and they are read instead of recomputed (no GEMM), then overwritten by the gradient.
    ``options`` as in :func:`linear_entropy_fwd`; ``options.autotune`` searches
    ``TUNING_CONFIGS`` for the recompute pass (on a GPU: the interpreter has no benchmarker).
    """
    check_blocks(blocks)
    n_rows, V = out.shape
    check_logits_buffer("out", out, out.dtype, weight.shape[0])
    if n_rows == 0:
        return out
    args = (
        hidden, weight, bias, rows, labels, entropy, stats, grad_entropy, grad_logprobs, out,
        row_start, n_rows, V, hidden.shape[1], hidden.stride(0), hidden.stride(1),
        weight.stride(0), weight.stride(1), out.stride(0), inv_temperature,
    )  # fmt: skip
    meta = dict(
        HAS_BIAS=bias is not None,
        HAS_ROWS=rows is not None,
        HAS_LABELS=labels is not None,
        FROM_LOGITS=from_logits,
    )
    config = config_for(options.target(hidden.device), hidden.dtype, blocks)
    if from_logits and blocks is None:
        config = elementwise(config)
    autotune = options.autotune and not options.interpreting
    if blocks is None and autotune and not from_logits:
        _tuned(_linear_entropy_grad_logits_kernel)[
            lambda m: grad_grid(n_rows, V, m["BLOCK_N"], m["BLOCK_V"])
        ](*args, **meta, GROUP_N=config.group_n)
        return out
    _linear_entropy_grad_logits_kernel[grad_grid(n_rows, V, config.block_n, config.block_v)](
        *args,
        **meta,
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        BLOCK_D=config.block_d,
        GROUP_N=config.group_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
