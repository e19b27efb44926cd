"""Entropy and label log-probs of ``softmax((hidden @ weight.T + bias) / T)`` without ever
storing the ``[N, V]`` logits: Triton kernels, their launch configuration and launchers.

Forward (``linear_entropy_fwd``): a GEMM whose epilogue is the online entropy statistics.
For each ``BLOCK_N x BLOCK_V`` tile a program accumulates the logits
``x = hidden @ weight.T + bias`` over ``D`` in fp32 with ``tl.dot`` and folds the tile into
per-row running statistics ``m = max x``, ``s = sum exp(d)``, ``w = sum exp(d) * d`` with
``d = (x - m) / T`` (shift before scaling, the same statistics as the logits kernels in
``entropy_logits``), capturing the label's logit when its tile passes. The logits tile lives
only in registers, except that the forward can also write it (rounded to the input dtype,
the value the statistics use) for the first ``keep_rows`` rows, for a backward that then
reads it instead of recomputing it (``logits_out``). A second small kernel merges the
per-split statistics into ``H = log s - w / s``, ``log p(label) = (x_label - m) / T - log s``
and the row statistics ``stats = (m, log s)`` (``lse = m / T + log s``) that the backward
needs.

Schedule of the forward (persistent, grouped): the vocabulary is cut into ``S`` contiguous
splits and the row blocks into lanes of a group of ``G``; the grid is exactly ``G * S``
programs, no more than fit on the GPU at once (``sm_count * ctas_per_sm``), and program
``(g, s)`` walks row blocks ``g, g + G, g + 2G, ...`` over split ``s``. All programs step
through their splits together, so at any moment only ``G`` hidden blocks (each shared by
``S`` programs, re-read from L2 for every vocabulary tile) and ``S`` weight tiles (each
shared by ``G`` programs) are live: the hidden working set stays in L2 and each weight tile
comes from HBM once per group of ``G`` row blocks. ``G`` and ``S`` are chosen per launch so
that the busiest program does barely more than the average (``fwd_schedule``). Each program
runs its (row block, tile) pairs as one flat loop, resetting and storing the per-row state at
row-block boundaries.

The last vocabulary tile holds columns past ``V``; their weight rows load as 0, so their
logit would be ``0`` and would add ``exp(0 - m)`` to ``s``. That mass is large exactly when
every real logit is very negative (or one is peaked far below 0), so those columns are set to
``-inf`` before the statistics, never left at 0.

Backward (``linear_entropy_grad_logits``): for one chunk of rows, recompute each logits tile
with ``tl.dot`` in fp32 (or read the kept one) and write only the gradient w.r.t. the logits,
``[g_H * p * (-log p - H) + g_logp * (onehot(label) - p)] / T`` with
``log p = (x - m) / T - log s``, in the hidden dtype; the caller turns it into gradients
w.r.t. ``hidden`` / ``weight`` / ``bias`` with GEMMs. One tile per program, in grouped order
(``GROUP_N`` row blocks per column of vocabulary tiles) for the same L2 reuse. A row whose
upstream gradients are both 0 gets an exact 0 row, whatever its logits (NaN included).

Launch configuration: one known-good tile config per (target, dtype) and the forward's
persistent schedule, in ``_linear_config``, used by these launchers and by
``benchmark_plans`` (``_linear_plans``: what ``saei-fast kernels`` compiles);
``SAEI_AUTOTUNE=1`` searches a small set of configurations that compile without spilling
(keyed on the lm_head's shape, never on the number of rows). ``SAEI_LINEAR_TMA=1`` switches
the forward to the TMA variant of ``linear_entropy_tma`` (sm_90 only, opt-in, unmeasured).

Rows may be a subset (``rows``: int64 indices into ``hidden``), which is how masked tokens
(prompts, image tokens) cost nothing. A label outside ``[0, V)`` gives a NaN log-prob and
contributes no one-hot gradient (the vocabulary-parallel op relies on this for labels owned
by another rank).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from saei_fast.kernels._linear_config import (
    GemmConfig,
    elementwise,
    fwd_schedule,
    gemm_config,
)
from saei_fast.kernels.plan import LaunchPlan, Target, target_for

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
        # IEEE fp32 products for fp32 operands (the accuracy an fp32 user expects of a GEMM,
        # not TF32); 16-bit operands go to the tensor cores whatever this says.
        b_acc = tl.dot(b_h, b_w, b_acc, input_precision="ieee")
    return _bias_and_mask(b_acc, bias_ptr, o_cols, m_cols, HAS_BIAS)


@triton.jit
def _bias_and_mask(b_acc, bias_ptr, o_cols, m_cols, HAS_BIAS: tl.constexpr):
    """Add the bias to an fp32 logits tile and set the columns past ``V`` to ``-inf``."""
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


@triton.jit
def _fold_tile(
    b_x,
    first,
    b_m,
    b_s,
    b_w,
    b_label_x,
    labels_ptr,
    logits_ptr,
    o_rows,
    o_n,
    m_n,
    o_cols,
    m_cols,
    v_start,
    keep_rows,
    stride_ln,
    inv_temperature,
    HAS_LABELS: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """The forward's epilogue for one logits tile ``b_x`` (fp32, already rounded to the input
    dtype): keep it in ``logits_ptr`` for rows below ``keep_rows`` (``STORE_LOGITS``), then
    fold it into the running per-row statistics, restarted when ``first`` (the first tile of
    a row block). Shared by every forward kernel, so they all compute the same numbers."""
    if STORE_LOGITS:
        p_l = logits_ptr + o_n[:, None].to(tl.int64) * stride_ln + o_cols[None, :]
        m_l = (o_n < keep_rows)[:, None] & m_cols[None, :]
        tl.store(p_l, b_x.to(logits_ptr.dtype.element_ty), mask=m_l)
    # A new row block starts from empty statistics.
    b_m = tl.where(first, float("-inf"), b_m)
    b_s = tl.where(first, 0.0, b_s)
    b_w = tl.where(first, 0.0, b_w)
    b_label_x = tl.where(first, 0.0, b_label_x)
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
        # The label's column within this tile, in 32 bits (-1 when elsewhere).
        b_label = tl.load(labels_ptr + o_rows, mask=m_n, other=-1).to(tl.int64) - v_start
        c_label = tl.where((b_label >= 0) & (b_label < BLOCK_V), b_label, -1).to(tl.int32)
        m_hit = tl.arange(0, BLOCK_V)[None, :] == c_label[:, None]
        b_label_x += tl.sum(tl.where(m_hit, b_x, 0.0), axis=1)
    return b_m, b_s, b_w, b_label_x


@triton.jit
def _store_partials(
    part_m_ptr,
    part_s_ptr,
    part_w_ptr,
    part_label_ptr,
    o_part,
    m_n,
    b_m,
    b_s,
    b_w,
    b_label_x,
    HAS_LABELS: tl.constexpr,
):
    """Write one (split, row block)'s statistics for ``_merge_splits_kernel``."""
    tl.store(part_m_ptr + o_part, b_m, mask=m_n)
    tl.store(part_s_ptr + o_part, b_s, mask=m_n)
    tl.store(part_w_ptr + o_part, b_w, mask=m_n)
    if HAS_LABELS:
        tl.store(part_label_ptr + o_part, b_label_x, mask=m_n)


@triton.jit(do_not_specialize=["n_rows", "keep_rows", "group_rows", "n_splits"])
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
    logits_ptr,
    n_rows,
    keep_rows,
    V,
    D,
    group_rows,
    n_splits,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_ln,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (i_lane, i_split) of a persistent G x S grid (see the module docstring) walks
    # row blocks i_lane, i_lane + G, ... over the vocabulary tiles of split i_split, as one
    # flat loop over its (row block, tile) pairs: the per-row state is reset at the first tile
    # of each row block and stored at its last. (Nested loops cost the epilogue the registers
    # it needs: 255 and spills on sm_90, against ~200 flat.) Every split is non-empty
    # (fwd_schedule), so every (split, row) statistic is written.
    pid = tl.program_id(0)
    i_lane = pid % group_rows
    i_split = pid // group_rows
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits)
    v_begin = i_split * tiles_per_split * BLOCK_V
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v_begin, BLOCK_V))
    n_blocks = tl.maximum(tl.cdiv(tl.cdiv(n_rows, BLOCK_N) - i_lane, group_rows), 0)
    o_v = tl.arange(0, BLOCK_V)
    b_m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    b_s = tl.zeros((BLOCK_N,), tl.float32)
    b_w = tl.zeros((BLOCK_N,), tl.float32)
    b_label_x = tl.zeros((BLOCK_N,), tl.float32)
    for t in range(0, n_blocks * n_tiles):
        i_tile = t % n_tiles
        i_n = i_lane + (t // n_tiles) * group_rows
        v_start = v_begin + i_tile * BLOCK_V
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < n_rows
        if HAS_ROWS:
            o_rows = tl.load(rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
        else:
            o_rows = o_n.to(tl.int64)
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
        )
        # Logits rounded to the input dtype, as F.linear returns them: the statistics then
        # describe exactly the logits a backward may read back (STORE_LOGITS), and every
        # path computes the same function of the same rounded logits.
        b_x = b_x.to(hidden_ptr.dtype.element_ty).to(tl.float32)
        b_m, b_s, b_w, b_label_x = _fold_tile(
            b_x,
            i_tile == 0,
            b_m,
            b_s,
            b_w,
            b_label_x,
            labels_ptr,
            logits_ptr,
            o_rows,
            o_n,
            m_n,
            o_cols,
            m_cols,
            v_start,
            keep_rows,
            stride_ln,
            inv_temperature,
            HAS_LABELS,
            STORE_LOGITS,
            BLOCK_V,
        )
        if i_tile == n_tiles - 1:
            _store_partials(
                part_m_ptr,
                part_s_ptr,
                part_w_ptr,
                part_label_ptr,
                i_split * n_rows + o_n,
                m_n,
                b_m,
                b_s,
                b_w,
                b_label_x,
                HAS_LABELS,
            )


@triton.jit(do_not_specialize=["n_rows", "n_splits"])
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
    FROM_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Grouped order: GROUP_N row blocks take each vocabulary tile in turn, so the programs
    # running together share GROUP_N hidden blocks and a few weight tiles through L2.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(n_blocks - first, GROUP_N)
    i_n = first + (pid % per_group) % size
    i_v = (pid % per_group) // size
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
    p_g = grad_logits_ptr + o_n[:, None].to(tl.int64) * stride_gn + o_cols[None, :]
    m_g = m_n[:, None] & m_cols[None, :]
    if FROM_LOGITS:
        # The forward kept this chunk's logits here (STORE_LOGITS): no recompute, and the
        # gradient is written over them.
        b_x = tl.load(p_g, mask=m_g, other=float("-inf")).to(tl.float32)
    else:
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
        )
        b_x = b_x.to(hidden_ptr.dtype.element_ty).to(tl.float32)  # as the forward rounds
    b_logp = (b_x - b_max[:, None]) * inv_temperature - b_log_s[:, None]
    b_p = tl.exp(b_logp)
    # dH/dz = p * (-log p - H); dlogp/dz = onehot - p. p = 0 (a -inf logit) gives 0; a NaN
    # logit of a row that has an upstream gradient stays NaN.
    b_coef = b_g_entropy[:, None] * (-b_logp - b_entropy[:, None])
    m_live = b_g_entropy != 0.0
    if HAS_LABELS:
        b_g_logprob = tl.load(grad_logprob_ptr + o_rows, mask=m_n, other=0.0).to(tl.float32)
        b_label = tl.load(labels_ptr + o_rows, mask=m_n, other=-1).to(tl.int64)
        b_coef -= b_g_logprob[:, None]
        m_live = m_live | (b_g_logprob != 0.0)
    b_g = tl.where(b_p == 0.0, 0.0, b_p * b_coef)
    if HAS_LABELS:
        b_g += tl.where(o_cols[None, :] == b_label[:, None], b_g_logprob[:, None], 0.0)
    # A row whose upstream gradients are all 0 is treated as masked: exactly 0, even when
    # its logits are not finite.
    b_g = tl.where(m_live[:, None], b_g * inv_temperature, 0.0)
    tl.store(p_g, b_g.to(grad_logits_ptr.dtype.element_ty), mask=m_g)


# -------------------------------------------------------------------------------------------
# Launch configuration: one place for the launchers and for benchmark_plans
# -------------------------------------------------------------------------------------------


def _autotune_enabled() -> bool:
    # The interpreter has no benchmarker: the search only runs on a GPU.
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return not interpreting and os.environ.get("SAEI_AUTOTUNE", "0") not in ("", "0")


# Searched with SAEI_AUTOTUNE=1 (the grad kernel only: the forward's grid depends on the
# tile and occupancy of the config, so it keeps the verified table). Every configuration
# here compiles without spills for sm_90 and sm_80; 128 x 256 x 32 with 8 warps (36 B) and
# 128 x 128 x 64 with 4 warps (176 B) spilled and are gone.
TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)
    for (bn, bv, bd), warps, stages in (
        ((128, 128, 64), 8, 3),
        ((128, 128, 64), 8, 4),
        ((64, 128, 64), 4, 3),
        ((64, 128, 64), 8, 3),
        ((128, 64, 64), 4, 3),
        ((128, 64, 64), 8, 3),
        ((64, 64, 64), 4, 3),
    )
]


@functools.cache
def _tuned(kernel):
    # Opt-in search (SAEI_AUTOTUNE=1). The key holds the shapes of the lm_head only: the
    # number of rows changes every RL batch and must not trigger a new search.
    return triton.autotune(TUNING_CONFIGS, key=["V", "D", "HAS_BIAS", "HAS_LABELS"])(kernel)


def _check_blocks(blocks: tuple[int, int, int] | None) -> None:
    if blocks is not None and any(b < 16 or b & (b - 1) for b in blocks):
        raise ValueError(f"blocks must be powers of two >= 16 (tl.dot), got {blocks}")


def _check_logits_buffer(name: str, buffer: torch.Tensor, dtype: torch.dtype, V: int) -> None:
    if buffer.dim() != 2 or buffer.shape[1] != V or buffer.stride(1) != 1:
        raise ValueError(f"{name} must be [c, {V}] with unit column stride, got {buffer.shape}")
    if buffer.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {buffer.dtype}")


def _config_for(device: torch.device, dtype: torch.dtype, blocks) -> GemmConfig:
    config = gemm_config(target_for(device), dtype)
    if blocks is not None:
        config = dataclasses.replace(
            config, block_n=blocks[0], block_v=blocks[1], block_d=blocks[2]
        )
    return config


# -------------------------------------------------------------------------------------------
# Launchers
# -------------------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Entropy and label log-prob of ``softmax((hidden @ weight.T + bias) / T)`` per row.

    ``hidden [N, D]`` and ``weight [V, D]`` (same dtype, any strides), ``bias [V]`` or None,
    ``labels [N]`` (int, contiguous) or None, ``rows`` (int64 row indices to compute) or None
    for all. Returns ``(entropy [N], logprobs [N] or None, stats [N, 2])`` in float32 with
    ``stats = (max logit, log sum exp((x - max) / T))`` as in ``entropy_logits``; rows not in
    ``rows`` are 0. Extra memory is ``O(N * splits)``: no ``[N, V]`` tensor is built.
    ``logits_out [k, V]`` (unit column stride, the hidden dtype), when given, receives the
    logits of the first ``k`` computed rows (positions in ``rows``), rounded to the hidden
    dtype as the statistics use them, for a backward that reads them instead of recomputing
    (``linear_entropy_grad_logits(..., from_logits=True)``).
    ``blocks = (BLOCK_N, BLOCK_V, BLOCK_D)`` and ``num_splits`` override the launch
    configuration (tests use them to cross tile and split edges).
    """
    _check_blocks(blocks)
    if os.environ.get("SAEI_LINEAR_TMA", "0") not in ("", "0"):
        # Opt-in, unmeasured TMA variant for sm_90 (see linear_entropy_tma): same results.
        from saei_fast.kernels import linear_entropy_tma

        if linear_entropy_tma.tma_selected(hidden, weight):
            return linear_entropy_tma.linear_entropy_tma_fwd(
                hidden, weight, bias, rows, labels, inv_temperature,
                logits_out=logits_out, blocks=blocks, num_splits=num_splits,
            )  # fmt: skip
    V, D = weight.shape
    entropy, logprobs, stats, n_rows = forward_outputs(hidden, rows, labels)
    if n_rows == 0:
        return entropy, logprobs, stats

    if logits_out is not None:
        _check_logits_buffer("logits_out", logits_out, hidden.dtype, V)
    config = _config_for(hidden.device, hidden.dtype, blocks)
    schedule = fwd_schedule(target_for(hidden.device), config, n_rows, V, num_splits=num_splits)
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


MERGE_BLOCK = 128


def grad_grid(n_rows: int, V: int, block_n: int, block_v: int) -> tuple[int]:
    return (triton.cdiv(n_rows, block_n) * triton.cdiv(V, block_v),)


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
) -> torch.Tensor:
    """Gradient of ``sum(g_H * H + g_logp * logp)`` w.r.t. the logits of one chunk of rows.

    The chunk is ``out.shape[0]`` rows starting at position ``row_start`` of ``rows`` (or of
    ``hidden`` when ``rows`` is None). ``entropy``, ``stats [N, 2]`` (from the forward),
    ``grad_entropy``, ``grad_logprobs`` and ``labels`` are contiguous per-row tensors indexed
    by hidden row.
    ``out`` is a ``[c, V]`` tensor with unit column stride, written in its own dtype. With
    ``from_logits`` it holds the chunk's logits from the forward (``logits_out``) on entry
    and they are read instead of recomputed (no GEMM), then overwritten by the gradient.
    """
    _check_blocks(blocks)
    n_rows, V = out.shape
    _check_logits_buffer("out", out, out.dtype, weight.shape[0])
    if n_rows == 0:
        return out
    args = (
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
    )
    meta = dict(
        HAS_BIAS=bias is not None,
        HAS_ROWS=rows is not None,
        HAS_LABELS=labels is not None,
        FROM_LOGITS=from_logits,
    )
    config = _config_for(hidden.device, hidden.dtype, blocks)
    if from_logits and blocks is None:
        config = elementwise(config)
    if blocks is None and _autotune_enabled() and not from_logits:
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


def benchmark_plans(target: Target) -> list[LaunchPlan]:
    """Every launch of the linear-entropy paths for the benchmark shapes on ``target``, as
    ``saei-fast kernels`` compiles them (see ``_linear_plans``)."""
    from saei_fast.kernels._linear_plans import linear_benchmark_plans
    from saei_fast.kernels.linear_entropy_tma import tma_benchmark_plans

    # The opt-in TMA forward (sm_90 only) is reported beside the default one.
    return linear_benchmark_plans(target) + tma_benchmark_plans(target)
