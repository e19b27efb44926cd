"""The fused linear-entropy Triton kernels: entropy and label log-probs of
``softmax((hidden @ weight.T + bias) / T)`` without ever storing the ``[N, V]`` logits.

Forward (``_linear_entropy_fwd_kernel``): a GEMM whose epilogue is the online entropy
statistics. Each ``BLOCK_N x BLOCK_V`` tile of ``x = hidden @ weight.T + bias`` is
accumulated over ``D`` in fp32 (``tl.dot``) and folded into per-row running statistics
``m = max x``, ``s = sum exp(d)``, ``w = sum exp(d) * d``, ``d = (x - m) / T`` (as in
``kernels/entropy``), capturing the label's logit as its tile passes. The tile stays in
registers, except that it can be written (rounded to the input dtype, as the statistics use
it) for the first ``keep_rows`` rows, for a backward that reads it back.
``_merge_splits_kernel`` merges the per-split statistics into ``H = log s - w / s``,
``log p(label) = (x_label - m) / T - log s`` and ``stats = (m, log s)`` for the backward.

Schedule of the forward (persistent, grouped; ``config.fwd_schedule``): ``G`` lanes of row
blocks times ``S`` contiguous vocabulary splits, ``G * S`` programs, no more than fit on the
GPU at once; program ``(g, s)`` walks row blocks ``g, g + G, ...`` over split ``s`` as one flat
loop over its (row block, tile) pairs, so each weight tile comes from HBM once per group of
``G`` row blocks while the ``G`` live hidden blocks stay in L2.

Columns past ``V`` (in the last tile) would have logit 0 and add ``exp(0 - m)`` to ``s``, a
large mass exactly when every real logit is very negative: they are ``-inf``, never 0.

Backward (``_linear_entropy_grad_logits_kernel``): for one chunk of rows, recompute each
logits tile (or read the kept one) and write only the gradient w.r.t. the logits,
``[g_H * p * (-log p - H) + g_logp * (onehot(label) - p)] / T`` with
``log p = (x - m) / T - log s``, in the hidden dtype (the host's GEMMs make the gradients
w.r.t. ``hidden`` / ``weight`` / ``bias``). One tile per program, ``GROUP_N`` row blocks per
column of vocabulary tiles for L2 reuse. A row whose upstream gradients are both 0 gets an
exact 0 row, whatever its logits (NaN included).

Rows may be a subset (``rows``: int64 indices into ``hidden``): masked tokens cost nothing.
A label outside ``[0, V)`` gives a NaN log-prob and no one-hot gradient (vocabulary-parallel
use). The TMA forward (``tma``) shares the epilogue helpers: every forward, same numbers.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
