"""Per-token entropy and label log-probs from logits: the Triton kernels (``@triton.jit``).

Forward. Each program streams a range of one row's vocabulary in tiles ``[LANES, VEC]``: a
thread owns ``VEC`` contiguous logits of a lane (one 128-bit load) and keeps that lane's
running statistics in registers, ``m`` (max of the raw logits x), ``s = sum 2^d`` and
``w = sum 2^d * d`` with ``d = (x - m) * log2(e) / T``. The loop reduces only inside a thread
(no shuffle, no barrier); the lanes are merged once per range at the end. ``exp2`` with one
runtime multiplier ``scale = log2(e) / T`` is the only transcendental per logit. Then
``H = ln 2 * (log2 s - w / s)`` and ``ln s = ln 2 * log2 s``; only ``H``, the label log-prob and
the row statistics ``(m, ln s)`` are written (no softmax tensor; ``lse = m / T + ln s``).
Shifting by the maximum before scaling keeps every quantity small, so large logits lose no
precision to ``x / T`` rounding or to the cancellation of ``lse - E[z]``; every exponent is
clamped at -200 (where ``2^d`` is exactly 0 in fp32), so ``-inf`` logits and differences of
logits near +-3e38 that overflow to ``-inf`` add exactly 0 instead of ``0 * -inf = NaN``.

Vocabulary split. When there are too few rows to fill the GPU, each row's vocabulary is cut
into ``splits`` ranges, one program each; every program writes its partial ``(m, s, w)``
and the last one to finish a row (an atomic counter) merges them and writes the outputs.

Backward: recompute ``log p = (x - m) / T - ln s`` tile by tile and write
``dL/dlogits = [g_H * p * (-log p - H) + g_logp * (onehot(label) - p)] / T``
in the logits' dtype. ``-inf`` logits have ``p = 0`` and get gradient 0 (never NaN). Any
number of programs may share a row (no reduction).

A row whose logits are all ``-inf`` has no distribution: its entropy and log-prob are NaN.
Masked rows (mask False) are not read: their outputs and gradients are exactly 0; in the
backward a row whose upstream gradients are both 0 counts as masked (its gradient is 0 even
when its logits are not finite). An out-of-range label gives a NaN log-prob (the host check
catches it outside compile).

Their launch configuration is in ``config``, the launchers in ``launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E_VALUE = 1.4426950408889634
LOG2E = tl.constexpr(LOG2E_VALUE)
LN2 = tl.constexpr(0.6931471805599453)
# 2^x is exactly 0 in fp32 below -150; exponents are clamped here (see _clamp_exponent).
EXPONENT_FLOOR = tl.constexpr(-200.0)


@triton.jit
def _clamp_exponent(t):
    # 2^t is exactly 0 for t <= -200, so the clamp changes no sum, but keeps -inf (a -inf
    # logit, or a difference that overflowed) out of 0 * d. NaN (a NaN logit) stays NaN.
    return tl.maximum(t, EXPONENT_FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _lane_update(b_x, b_m, b_s, b_w, scale):
    """Fold a tile ``b_x [LANES, VEC]`` (fp32) into the per-lane statistics ``[LANES]``."""
    m_new = tl.maximum(b_m, tl.max(b_x, axis=1))
    # A lane that has seen only -inf has no finite maximum to shift by: any reference works.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = _clamp_exponent((b_m - m_ref) * scale)
    rescale = tl.exp2(shift)
    b_d = _clamp_exponent((b_x - m_ref[:, None]) * scale)
    b_e = tl.exp2(b_d)
    # Re-basing w from the old to the new maximum: sum 2^(d + shift) * (d + shift).
    b_w = rescale * (b_w + shift * b_s) + tl.sum(b_e * b_d, axis=1)
    b_s = rescale * b_s + tl.sum(b_e, axis=1)
    return m_new, b_s, b_w


@triton.jit
def _merge(b_m, b_s, b_w, scale):
    """Merge the statistics of several lanes (or programs) ``[K]`` into one ``(m, s, w)``."""
    m = tl.max(b_m, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    shift = _clamp_exponent((b_m - m_ref) * scale)
    rescale = tl.exp2(shift)
    s = tl.sum(rescale * b_s, axis=0)
    w = tl.sum(rescale * (b_w + shift * b_s), axis=0)
    return m, s, w


@triton.jit
def _range_stats(p_row, v_lo, v_hi, stride_v, scale, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """``(m, s, w)`` of the logits ``p_row[v_lo:v_hi]``: full tiles without masks, then one
    masked tail."""
    LANES: tl.constexpr = BLOCK_V // VEC
    o_x = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    b_m = tl.full((LANES,), float("-inf"), tl.float32)
    b_s = tl.zeros((LANES,), tl.float32)
    b_w = tl.zeros((LANES,), tl.float32)
    v_end = v_lo + (v_hi - v_lo) // BLOCK_V * BLOCK_V
    for v_start in range(v_lo, v_end, BLOCK_V):
        b_x = tl.load(p_row + (v_start + o_x) * stride_v).to(tl.float32)
        b_m, b_s, b_w = _lane_update(b_x, b_m, b_s, b_w, scale)
    if v_end < v_hi:
        o_cols = v_end + o_x
        # Lanes past the range load -inf, so they add 2^-200 = 0 and never 2^0.
        b_x = tl.load(p_row + o_cols * stride_v, mask=o_cols < v_hi, other=float("-inf"))
        b_m, b_s, b_w = _lane_update(b_x.to(tl.float32), b_m, b_s, b_w, scale)
    return _merge(b_m, b_s, b_w, scale)


@triton.jit
def _row_pointer(logits_ptr, i_row, rows_per_outer, stride_outer, stride_inner):
    # Leading dims may be non-contiguous: the row lives at (outer, inner) of a 3-D view.
    p_row = logits_ptr + (i_row // rows_per_outer) * stride_outer
    return p_row + (i_row % rows_per_outer) * stride_inner


@triton.jit
def _write_entropy(entropy_ptr, stats_ptr, i_row, m, s, w):
    """Store ``H`` and the row statistics ``(m, ln s)``; return ``log2 s``."""
    log2_s = tl.log2(s)
    tl.store(entropy_ptr + i_row, (log2_s - w / s) * LN2)
    tl.store(stats_ptr + 2 * i_row, m)
    tl.store(stats_ptr + 2 * i_row + 1, log2_s * LN2)
    return log2_s


@triton.jit
def _write_logprob(p_row, labels_ptr, logprob_ptr, i_row, m, log2_s, stride_v, V, scale):
    label = tl.load(labels_ptr + i_row).to(tl.int64)
    in_range = (label >= 0) & (label < V)
    b_label = tl.load(p_row + label * stride_v, mask=in_range, other=0.0).to(tl.float32)
    logprob = ((b_label - m) * scale - log2_s) * LN2
    tl.store(logprob_ptr + i_row, tl.where(in_range, logprob, float("nan")))


@triton.jit
def _write_masked_row(entropy_ptr, logprob_ptr, stats_ptr, i_row, HAS_LABELS: tl.constexpr):
    tl.store(entropy_ptr + i_row, 0.0)
    tl.store(stats_ptr + 2 * i_row, 0.0)
    tl.store(stats_ptr + 2 * i_row + 1, 0.0)
    if HAS_LABELS:
        tl.store(logprob_ptr + i_row, 0.0)


@triton.jit(do_not_specialize=["rows_per_outer"])
def _entropy_fwd_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    rows_per_outer,
    stride_outer,
    stride_inner,
    stride_v,
    V,
    scale,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    """One program per row: the whole vocabulary, then the outputs."""
    i_row = tl.program_id(0).to(tl.int64)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + i_row) != 0
    if valid:
        p_row = _row_pointer(logits_ptr, i_row, rows_per_outer, stride_outer, stride_inner)
        m, s, w = _range_stats(p_row, 0, V, stride_v, scale, BLOCK_V, VEC)
        log2_s = _write_entropy(entropy_ptr, stats_ptr, i_row, m, s, w)
        if HAS_LABELS:
            _write_logprob(p_row, labels_ptr, logprob_ptr, i_row, m, log2_s, stride_v, V, scale)
    else:
        _write_masked_row(entropy_ptr, logprob_ptr, stats_ptr, i_row, HAS_LABELS)


@triton.jit(do_not_specialize=["rows_per_outer"])
def _entropy_fwd_split_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    partial_ptr,
    count_ptr,
    rows_per_outer,
    stride_outer,
    stride_inner,
    stride_v,
    V,
    chunk,
    n_splits,
    scale,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    """Program (row, split) takes ``chunk`` logits of the row; the last to finish merges."""
    i_row = tl.program_id(0).to(tl.int64)
    i_split = tl.program_id(1)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + i_row) != 0
    if valid:
        p_row = _row_pointer(logits_ptr, i_row, rows_per_outer, stride_outer, stride_inner)
        v_lo = i_split * chunk
        m, s, w = _range_stats(
            p_row, v_lo, tl.minimum(v_lo + chunk, V), stride_v, scale, BLOCK_V, VEC
        )
        p_part = partial_ptr + (i_row * n_splits + i_split) * 3
        tl.store(p_part, m)
        tl.store(p_part + 1, s)
        tl.store(p_part + 2, w)
        # Every thread's partial store happens before the release of the counter.
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + i_row, 1, sem="acq_rel", scope="gpu")
        if done == n_splits - 1:
            o_split = tl.arange(0, MAX_SPLITS)
            m_split = o_split < n_splits
            p_parts = partial_ptr + i_row * n_splits * 3 + o_split * 3
            # .cg: read the other programs' partials from L2, never from a stale L1 line.
            b_m = tl.load(p_parts, mask=m_split, other=float("-inf"), cache_modifier=".cg")
            b_s = tl.load(p_parts + 1, mask=m_split, other=0.0, cache_modifier=".cg")
            b_w = tl.load(p_parts + 2, mask=m_split, other=0.0, cache_modifier=".cg")
            m, s, w = _merge(b_m, b_s, b_w, scale)
            log2_s = _write_entropy(entropy_ptr, stats_ptr, i_row, m, s, w)
            if HAS_LABELS:
                _write_logprob(p_row, labels_ptr, logprob_ptr, i_row, m, log2_s, stride_v, V, scale)
    elif i_split == 0:
        _write_masked_row(entropy_ptr, logprob_ptr, stats_ptr, i_row, HAS_LABELS)


@triton.jit
def _grad_tile(b_x, o_cols, row_max, ln_s, inv_t, g_scale, g_offset, g_label, label):
    """dL/dlogits of one tile: ``p * (g_scale * log p + g_offset)``, plus ``g_label`` at the
    label (``g_scale = -g_H / T``, ``g_offset = -(g_H H + g_logp) / T``). Natural-log units
    as in the forward's statistics: where ``-log p`` and ``H`` nearly cancel, every extra
    rounding of ``log p`` would show in the gradient."""
    b_logp = _clamp_exponent((b_x.to(tl.float32) - row_max) * inv_t - ln_s)
    b_g = tl.exp2(b_logp * LOG2E) * (g_scale * b_logp + g_offset)
    return tl.where(o_cols == label, b_g + g_label, b_g)


@triton.jit
def _to_output(b_g, out_ty: tl.constexpr, ROUND_TO_BF16: tl.constexpr):
    if ROUND_TO_BF16:
        # Triton's CPU interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even:
        # round the fp32 bits here so that its cast is exact (NaN is left as it is).
        bits = b_g.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        b_g = tl.where(b_g == b_g, bits.to(tl.float32, bitcast=True), b_g)
    return b_g.to(out_ty)


@triton.jit(do_not_specialize=["rows_per_outer"])
def _entropy_bwd_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    entropy_ptr,
    stats_ptr,
    grad_entropy_ptr,
    grad_logprob_ptr,
    grad_logits_ptr,
    rows_per_outer,
    stride_outer,
    stride_inner,
    stride_v,
    stride_grad_row,
    V,
    chunk,
    inv_t,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr,
):
    """Program (row, split) writes the gradient of ``chunk`` logits of the row."""
    i_row = tl.program_id(0).to(tl.int64)
    v_lo = tl.program_id(1) * chunk
    v_hi = tl.minimum(v_lo + chunk, V)
    v_end = v_lo + (v_hi - v_lo) // BLOCK_V * BLOCK_V
    o_v = tl.arange(0, BLOCK_V)
    p_grad = grad_logits_ptr + i_row * stride_grad_row
    out_ty = grad_logits_ptr.dtype.element_ty

    g_entropy = tl.load(grad_entropy_ptr + i_row).to(tl.float32)
    g_logprob = 0.0
    label = -1
    if HAS_LABELS:
        g_logprob = tl.load(grad_logprob_ptr + i_row).to(tl.float32)
    valid = (g_entropy != 0.0) | (g_logprob != 0.0)
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + i_row) != 0)
    if valid:
        p_row = _row_pointer(logits_ptr, i_row, rows_per_outer, stride_outer, stride_inner)
        row_max = tl.load(stats_ptr + 2 * i_row)
        ln_s = tl.load(stats_ptr + 2 * i_row + 1)
        entropy = tl.load(entropy_ptr + i_row)
        g_scale = -g_entropy * inv_t
        g_offset = -(g_entropy * entropy + g_logprob) * inv_t
        g_label = g_logprob * inv_t
        if HAS_LABELS:
            label = tl.load(labels_ptr + i_row).to(tl.int32)
        for v_start in range(v_lo, v_end, BLOCK_V):
            b_x = tl.load(p_row + (v_start + o_v) * stride_v)
            b_g = _grad_tile(
                b_x, o_v, row_max, ln_s, inv_t, g_scale, g_offset, g_label, label - v_start
            )
            tl.store(p_grad + v_start + o_v, _to_output(b_g, out_ty, ROUND_TO_BF16))
        if v_end < v_hi:
            o_cols = v_end + o_v
            m_cols = o_cols < v_hi
            b_x = tl.load(p_row + o_cols * stride_v, mask=m_cols, other=float("-inf"))
            b_g = _grad_tile(b_x, o_cols, row_max, ln_s, inv_t, g_scale, g_offset, g_label, label)
            tl.store(p_grad + o_cols, _to_output(b_g, out_ty, ROUND_TO_BF16), mask=m_cols)
    else:
        zeros = tl.zeros((BLOCK_V,), tl.float32).to(out_ty)
        for v_start in range(v_lo, v_end, BLOCK_V):
            tl.store(p_grad + v_start + o_v, zeros)
        if v_end < v_hi:
            tl.store(p_grad + v_end + o_v, zeros, mask=v_end + o_v < v_hi)
