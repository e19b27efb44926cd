"""Entropy and label log-probs of ``softmax((hidden @ weight.T + bias) / T)`` without ever
storing the ``[N, V]`` logits: Triton kernels and their launchers.

Forward (``linear_entropy_fwd``): a GEMM whose epilogue is the online entropy statistics.
A program owns ``BLOCK_N`` token rows and a contiguous range of vocabulary tiles; for each
``BLOCK_N x BLOCK_V`` tile it accumulates the logits ``x = hidden @ weight.T + bias`` over
``D`` in fp32 with ``tl.dot`` and folds the tile into per-row running statistics
``m = max x``, ``s = sum exp(d)``, ``w = sum exp(d) * d`` with ``d = (x - m) / T`` (shift
before scaling, the same statistics as the logits kernels in ``entropy_logits``), capturing
the label's logit when its tile passes. The logits tile lives only in registers. The
vocabulary is split over several programs per row block when there are few row blocks, so
that small ``N`` still fills the GPU; a second small kernel merges the per-split statistics
into ``H = log s - w / s``, ``log p(label) = (x_label - m) / T - log s`` and the row
statistics ``stats = (m, log s)`` (``lse = m / T + log s``) that the backward needs.

The last vocabulary tile holds columns past ``V``; their weight rows load as 0, so their
logit would be ``0`` and would add ``exp(0 - m)`` to ``s``. That mass is large exactly when
every real logit is very negative (or one is peaked far below 0), so those columns are set to
``-inf`` before the statistics, never left at 0.

Backward (``linear_entropy_grad_logits``): for one chunk of rows, recompute each logits tile
with ``tl.dot`` in fp32 and write only the gradient w.r.t. the logits,
``[g_H * p * (-log p - H) + g_logp * (onehot(label) - p)] / T`` with
``log p = (x - m) / T - log s``, in the hidden dtype; the caller turns it into gradients
w.r.t. ``hidden`` / ``weight`` / ``bias`` with two GEMMs.

Launch configuration: one known-good tile config per dtype; ``SAEI_AUTOTUNE=1`` searches a
small set instead (keyed on the lm_head's shape, never on the number of rows).

Rows may be a subset (``rows``: int64 indices into ``hidden``), which is how masked tokens
(prompts, image tokens) cost nothing. A label outside ``[0, V)`` gives a NaN log-prob and
contributes no one-hot gradient (the vocabulary-parallel op relies on this for labels owned
by another rank).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# -------------------------------------------------------------------------------------------
# Kernels
# -------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    o_rows,
    m_n,
    o_cols,
    m_cols,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``hidden[o_rows] @ weight[o_cols].T + bias[o_cols]`` as an fp32 register tile;
    columns past ``V`` are ``-inf`` (never 0: see the module docstring)."""
    o_d = tl.arange(0, BLOCK_D)
    b_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        o_dd = d_start + o_d
        m_d = o_dd < D
        p_h = hidden_ptr + o_rows[:, None] * stride_hn + o_dd[None, :] * stride_hd
        b_h = tl.load(p_h, mask=m_n[:, None] & m_d[None, :], other=0.0)
        # The weight tile is read transposed, [BLOCK_D, BLOCK_V], straight from [V, D].
        p_w = weight_ptr + o_cols[None, :].to(tl.int64) * stride_wv + o_dd[:, None] * stride_wd
        b_w = tl.load(p_w, mask=m_cols[None, :] & m_d[:, None], other=0.0)
        b_acc = tl.dot(b_h, b_w, b_acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_cols, mask=m_cols, other=0.0).to(tl.float32)
        b_acc += b_bias[None, :]
    return tl.where(m_cols[None, :], b_acc, float("-inf"))


@triton.jit
def _merge_stats(b_m, b_s, b_w, c_m, c_s, c_w, inv_temperature):
    """Merge running statistics ``(m, s, w)`` with another set ``(c_m, c_s, c_w)`` over
    disjoint columns; ``w`` is kept relative to the running maximum (no cancellation)."""
    m_new = tl.maximum(b_m, c_m)
    # While every logit so far is -inf there is no finite maximum to shift by.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift_b = (b_m - m_safe) * inv_temperature  # -inf before the first finite logit
    shift_c = (c_m - m_safe) * inv_temperature
    a = tl.exp(shift_b)
    c = tl.exp(shift_c)
    shift_b = tl.where(b_s > 0.0, shift_b, 0.0)
    shift_c = tl.where(c_s > 0.0, shift_c, 0.0)
    w_new = a * (b_w + shift_b * b_s) + c * (c_w + shift_c * c_s)
    s_new = a * b_s + c * c_s
    return m_new, s_new, w_new


@triton.jit(do_not_specialize=["n_rows", "n_splits"])
def _linear_entropy_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    labels_ptr,
    part_m_ptr,
    part_s_ptr,
    part_w_ptr,
    part_label_ptr,
    n_rows,
    V,
    D,
    n_splits,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Row blocks vary fastest in launch order, so the programs running together read the
    # same weight tiles and share them through L2.
    i_n = tl.program_id(0)
    i_split = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n_rows
    if HAS_ROWS:
        o_rows = tl.load(rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    else:
        o_rows = o_n.to(tl.int64)
    if HAS_LABELS:
        b_label = tl.load(labels_ptr + o_rows, mask=m_n, other=-1).to(tl.int64)
    o_v = tl.arange(0, BLOCK_V)

    b_m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    b_s = tl.zeros((BLOCK_N,), tl.float32)
    b_w = tl.zeros((BLOCK_N,), tl.float32)
    b_label_x = tl.zeros((BLOCK_N,), tl.float32)
    # A contiguous range of vocabulary tiles per split (the last splits may be empty: they
    # store m = -inf, s = 0, which the merge ignores).
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits)
    v_begin = i_split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        o_cols = v_start + o_v
        m_cols = o_cols < V
        b_x = _logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            o_rows,
            m_n,
            o_cols,
            m_cols,
            D,
            stride_hn,
            stride_hd,
            stride_wv,
            stride_wd,
            HAS_BIAS,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
            DOT_PRECISION,
        )
        # The tile's own statistics, then one merge into the running ones.
        c_m = tl.max(b_x, axis=1)
        c_safe = tl.where(c_m == float("-inf"), 0.0, c_m)
        b_d = (b_x - c_safe[:, None]) * inv_temperature
        b_e = tl.exp(b_d)
        b_ed = tl.where(b_e > 0.0, b_e * b_d, 0.0)  # 0 * -inf must count as 0
        b_m, b_s, b_w = _merge_stats(
            b_m, b_s, b_w, c_m, tl.sum(b_e, axis=1), tl.sum(b_ed, axis=1), inv_temperature
        )
        if HAS_LABELS:
            m_hit = o_cols[None, :] == b_label[:, None]
            b_label_x += tl.sum(tl.where(m_hit, b_x, 0.0), axis=1)

    o_part = i_split * n_rows + o_n
    tl.store(part_m_ptr + o_part, b_m, mask=m_n)
    tl.store(part_s_ptr + o_part, b_s, mask=m_n)
    tl.store(part_w_ptr + o_part, b_w, mask=m_n)
    if HAS_LABELS:
        tl.store(part_label_ptr + o_part, b_label_x, mask=m_n)


@triton.jit(do_not_specialize=["n_rows"])
def _merge_splits_kernel(
    rows_ptr,
    labels_ptr,
    part_m_ptr,
    part_s_ptr,
    part_w_ptr,
    part_label_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    n_rows,
    n_splits,
    V,
    inv_temperature,
    HAS_ROWS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < n_rows
    b_m = tl.full((BLOCK,), float("-inf"), tl.float32)
    b_s = tl.zeros((BLOCK,), tl.float32)
    b_w = tl.zeros((BLOCK,), tl.float32)
    b_label_x = tl.zeros((BLOCK,), tl.float32)
    for i_split in range(0, n_splits):
        o_part = i_split * n_rows + o_n
        c_m = tl.load(part_m_ptr + o_part, mask=m_n, other=float("-inf"))
        c_s = tl.load(part_s_ptr + o_part, mask=m_n, other=0.0)
        c_w = tl.load(part_w_ptr + o_part, mask=m_n, other=0.0)
        b_m, b_s, b_w = _merge_stats(b_m, b_s, b_w, c_m, c_s, c_w, inv_temperature)
        if HAS_LABELS:
            b_label_x += tl.load(part_label_ptr + o_part, mask=m_n, other=0.0)

    if HAS_ROWS:
        o_rows = tl.load(rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
    else:
        o_rows = o_n.to(tl.int64)
    log_s = tl.log(b_s)
    tl.store(entropy_ptr + o_rows, log_s - b_w / b_s, mask=m_n)
    tl.store(stats_ptr + 2 * o_rows, b_m, mask=m_n)
    tl.store(stats_ptr + 2 * o_rows + 1, log_s, mask=m_n)
    if HAS_LABELS:
        label = tl.load(labels_ptr + o_rows, mask=m_n, other=0).to(tl.int64)
        in_range = (label >= 0) & (label < V)
        logprob = (b_label_x - b_m) * inv_temperature - log_s
        tl.store(logprob_ptr + o_rows, tl.where(in_range, logprob, float("nan")), mask=m_n)


@triton.jit(do_not_specialize=["row_start", "n_rows"])
def _linear_entropy_grad_logits_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    labels_ptr,
    entropy_ptr,
    stats_ptr,
    grad_entropy_ptr,
    grad_logprob_ptr,
    grad_logits_ptr,
    row_start,
    n_rows,
    V,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_gn,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_v = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n_rows
    o_index = row_start + o_n
    if HAS_ROWS:
        o_rows = tl.load(rows_ptr + o_index, mask=m_n, other=0).to(tl.int64)
    else:
        o_rows = o_index.to(tl.int64)
    o_cols = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_cols = o_cols < V

    b_max = tl.load(stats_ptr + 2 * o_rows, mask=m_n, other=0.0)
    b_log_s = tl.load(stats_ptr + 2 * o_rows + 1, mask=m_n, other=0.0)
    b_entropy = tl.load(entropy_ptr + o_rows, mask=m_n, other=0.0)
    b_g_entropy = tl.load(grad_entropy_ptr + o_rows, mask=m_n, other=0.0).to(tl.float32)
    b_x = _logits_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        o_rows,
        m_n,
        o_cols,
        m_cols,
        D,
        stride_hn,
        stride_hd,
        stride_wv,
        stride_wd,
        HAS_BIAS,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
        DOT_PRECISION,
    )
    b_logp = (b_x - b_max[:, None]) * inv_temperature - b_log_s[:, None]
    b_p = tl.exp(b_logp)
    # dH/dz = p * (-log p - H); dlogp/dz = onehot - p. p = 0 (a -inf logit) gives 0.
    b_coef = b_g_entropy[:, None] * (-b_logp - b_entropy[:, None])
    if HAS_LABELS:
        b_g_logprob = tl.load(grad_logprob_ptr + o_rows, mask=m_n, other=0.0).to(tl.float32)
        b_label = tl.load(labels_ptr + o_rows, mask=m_n, other=-1).to(tl.int64)
        b_coef -= b_g_logprob[:, None]
    b_g = tl.where(b_p > 0.0, b_p * b_coef, 0.0)
    if HAS_LABELS:
        b_g += tl.where(o_cols[None, :] == b_label[:, None], b_g_logprob[:, None], 0.0)
    b_g *= inv_temperature
    p_g = grad_logits_ptr + o_n[:, None].to(tl.int64) * stride_gn + o_cols[None, :]
    tl.store(p_g, b_g.to(grad_logits_ptr.dtype.element_ty), mask=m_n[:, None] & m_cols[None, :])


# -------------------------------------------------------------------------------------------
# Launchers
# -------------------------------------------------------------------------------------------


def _gemm_blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)``, one known-good config per dtype.

    16-bit inputs use tensor cores with 128 x 128 output tiles; fp32 inputs use IEEE fp32
    products (the accuracy an fp32 user expects from a GEMM) with smaller tiles so that three
    pipeline stages of fp32 operands fit in shared memory.
    """
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 64, 8, 3


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _autotune_enabled() -> bool:
    # The interpreter has no benchmarker: the search only runs on a GPU.
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return not interpreting and os.environ.get("SAEI_AUTOTUNE", "0") not in ("", "0")


_TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)
    for bn, bv, bd in ((128, 128, 64), (64, 128, 64), (128, 64, 64), (64, 64, 64), (128, 256, 32))
    for warps, stages in ((4, 3), (8, 3), (8, 4))
]


@functools.cache
def _tuned(kernel):
    # Opt-in search (SAEI_AUTOTUNE=1). The key holds the shapes of the lm_head only: the
    # number of rows changes every RL batch and must not trigger a new search.
    return triton.autotune(
        _TUNING_CONFIGS, key=["V", "D", "HAS_BIAS", "HAS_LABELS", "DOT_PRECISION"]
    )(kernel)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(n_row_blocks: int, n_vocab_tiles: int, device: torch.device) -> int:
    # About two programs per SM. The interpreter (CPU tensors) has no SMs: use a few splits
    # so the merge is exercised there too.
    if device.type != "cuda":
        target = 4
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = 2 * _multiprocessor_count(index)
    return max(1, min(n_vocab_tiles, triton.cdiv(target, max(1, n_row_blocks))))


def _check_blocks(blocks: tuple[int, int, int] | None) -> None:
    if blocks is not None and any(b < 16 or b & (b - 1) for b in blocks):
        raise ValueError(f"blocks must be powers of two >= 16 (tl.dot), got {blocks}")


def _launch(kernel, grid, dtype, blocks, *args, **meta):
    """One fixed config (``blocks`` or the dtype's default), or the opt-in search."""
    meta["DOT_PRECISION"] = _dot_precision(dtype)
    if blocks is None and _autotune_enabled():
        _tuned(kernel)[grid](*args, **meta)
        return
    block_n, block_v, block_d, num_warps, num_stages = _gemm_blocks(dtype)
    if blocks is not None:
        block_n, block_v, block_d = blocks
    config = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d}
    kernel[grid](*args, **meta, **config, num_warps=num_warps, num_stages=num_stages)


def linear_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    labels: torch.Tensor | None,
    inv_temperature: float,
    *,
    blocks: tuple[int, int, int] | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Entropy and label log-prob of ``softmax((hidden @ weight.T + bias) / T)`` per row.

    ``hidden [N, D]`` and ``weight [V, D]`` (same dtype, any strides), ``bias [V]`` or None,
    ``labels [N]`` (int, contiguous) or None, ``rows`` (int64 row indices to compute) or None
    for all. Returns ``(entropy [N], logprobs [N] or None, stats [N, 2])`` in float32 with
    ``stats = (max logit, log sum exp((x - max) / T))`` as in ``entropy_logits``; rows not in
    ``rows`` are 0. Extra memory is ``O(N * num_splits)``: no ``[N, V]`` tensor is built.
    ``blocks = (BLOCK_N, BLOCK_V, BLOCK_D)`` and ``num_splits`` override the launch
    configuration (tests use them to cross tile and split edges).
    """
    _check_blocks(blocks)
    N, D = hidden.shape
    V = weight.shape[0]
    make = torch.zeros if rows is not None else torch.empty
    entropy = make(N, dtype=torch.float32, device=hidden.device)
    stats = make(N, 2, dtype=torch.float32, device=hidden.device)
    logprobs = make(N, dtype=torch.float32, device=hidden.device) if labels is not None else None
    n_rows = N if rows is None else rows.numel()
    if n_rows == 0:
        return entropy, logprobs, stats

    if num_splits is None:
        block_n, block_v = blocks[:2] if blocks is not None else _gemm_blocks(hidden.dtype)[:2]
        n_tiles = triton.cdiv(V, block_v)
        num_splits = _num_splits(triton.cdiv(n_rows, block_n), n_tiles, hidden.device)
    splits = num_splits
    parts = torch.empty(4 if labels is not None else 3, splits, n_rows, device=hidden.device)
    _launch(
        _linear_entropy_fwd_kernel,
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits),
        hidden.dtype,
        blocks,
        hidden,
        weight,
        bias,
        rows,
        labels,
        parts[0],
        parts[1],
        parts[2],
        parts[3] if labels is not None else None,
        n_rows,
        V,
        D,
        splits,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        inv_temperature,
        HAS_BIAS=bias is not None,
        HAS_ROWS=rows is not None,
        HAS_LABELS=labels is not None,
    )
    merge_block = 128
    _merge_splits_kernel[(triton.cdiv(n_rows, merge_block),)](
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
        splits,
        V,
        inv_temperature,
        HAS_ROWS=rows is not None,
        HAS_LABELS=labels is not None,
        BLOCK=merge_block,
        num_warps=4,
    )
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
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(g_H * H + g_logp * logp)`` w.r.t. the logits of one chunk of rows.

    The chunk is ``out.shape[0]`` rows starting at position ``row_start`` of ``rows`` (or of
    ``hidden`` when ``rows`` is None). ``entropy``, ``stats [N, 2]`` (from the forward),
    ``grad_entropy``, ``grad_logprobs`` and ``labels`` are contiguous per-row tensors indexed
    by hidden row.
    ``out`` is a ``[c, V]`` tensor with unit column stride, written in its own dtype.
    """
    _check_blocks(blocks)
    n_rows, V = out.shape
    if out.stride(1) != 1 or weight.shape[0] != V:
        raise ValueError(f"out must be [c, {weight.shape[0]}] with unit column stride")
    if n_rows == 0:
        return out
    _launch(
        _linear_entropy_grad_logits_kernel,
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"])),
        hidden.dtype,
        blocks,
        hidden,
        weight,
        bias,
        rows,
        labels,
        entropy,
        stats,
        grad_entropy,
        grad_logprobs,
        out,
        row_start,
        n_rows,
        V,
        hidden.shape[1],
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        inv_temperature,
        HAS_BIAS=bias is not None,
        HAS_ROWS=rows is not None,
        HAS_LABELS=labels is not None,
    )
    return out
