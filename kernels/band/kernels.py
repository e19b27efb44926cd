"""The band-select kernels, one section per schedule (see ``launch`` for when each runs).

- ``segment``: ``_band_segment_kernel``, one program per segment that walks it in tiles, all
  radix passes in a single launch.
- ``chunked``: one program per chunk of a segment; ``_band_chunk_pass_kernel`` is launched
  once per radix pass and adds its chunk's histograms to the segment's with atomics, the next
  launch descends; ``_band_chunk_select_kernel`` then writes the selection.

Keys, histograms and the descent are the building blocks of ``radix``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from saei_fast.kernels.band.radix import (
    _descend,
    _histogram,
    _in_band,
    _rank_boundary,
    _segment_range,
    _tile_keys,
)

# -------------------------------------------------------------------------------------------
# Schedule "segment": one program per segment, one launch
# -------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seg_len", "pos_bits", "n_passes", "lo_bits", "hi_bits"])
def _band_segment_kernel(
    values_ptr,
    valid_ptr,
    bounds_ptr,
    out_ptr,
    seg_len,
    pos_bits,
    n_passes,
    lo_bits,
    hi_bits,
    HAS_VALID: tl.constexpr,
    UNIFORM: tl.constexpr,
    TILE: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    i_seg = tl.program_id(0).to(tl.int64)
    seg_start, seg_end = _segment_range(i_seg, bounds_ptr, seg_len, UNIFORM)
    top_shift = (n_passes - 1) * RADIX_BITS

    # Pass 0 histograms the top digit of every valid key: its total is n, which fixes both
    # boundary ranks, and both boundaries descend from it.
    b_hist = tl.zeros([NUM_BINS], tl.int32)
    for t_start in range(seg_start, seg_end, TILE):
        _, _, m_valid, b_key = _tile_keys(
            values_ptr, valid_ptr, seg_start, seg_end, t_start, pos_bits, TILE, HAS_VALID
        )
        b_hist += _histogram((b_key >> top_shift).to(tl.int32), m_valid, NUM_BINS)
    n = tl.sum(b_hist, axis=0)
    prefix_lo, rank_lo, shift_lo, done_lo = _rank_boundary(n, lo_bits, top_shift + RADIX_BITS)
    prefix_hi, rank_hi, shift_hi, done_hi = _rank_boundary(n, hi_bits, top_shift + RADIX_BITS)
    prefix_lo, rank_lo, shift_lo, done_lo = _descend(
        b_hist, prefix_lo, rank_lo, shift_lo, done_lo, RADIX_BITS, NUM_BINS
    )
    prefix_hi, rank_hi, shift_hi, done_hi = _descend(
        b_hist, prefix_hi, rank_hi, shift_hi, done_hi, RADIX_BITS, NUM_BINS
    )

    # Later passes: the next digit of the keys that share each boundary's prefix. Keys are
    # unique, so both are resolved after at most n_passes digits; the shift test is a guard.
    digit_shift = top_shift - RADIX_BITS
    while ((done_lo & done_hi) == 0) & (digit_shift >= 0):
        b_hist_lo = tl.zeros([NUM_BINS], tl.int32)
        b_hist_hi = tl.zeros([NUM_BINS], tl.int32)
        for t_start in range(seg_start, seg_end, TILE):
            _, _, m_valid, b_key = _tile_keys(
                values_ptr, valid_ptr, seg_start, seg_end, t_start, pos_bits, TILE, HAS_VALID
            )
            b_digit = ((b_key >> digit_shift) & (NUM_BINS - 1)).to(tl.int32)
            if not done_lo:
                m_lo = m_valid & ((b_key >> shift_lo) == prefix_lo)
                b_hist_lo += _histogram(b_digit, m_lo, NUM_BINS)
            if not done_hi:
                m_hi = m_valid & ((b_key >> shift_hi) == prefix_hi)
                b_hist_hi += _histogram(b_digit, m_hi, NUM_BINS)
        prefix_lo, rank_lo, shift_lo, done_lo = _descend(
            b_hist_lo, prefix_lo, rank_lo, shift_lo, done_lo, RADIX_BITS, NUM_BINS
        )
        prefix_hi, rank_hi, shift_hi, done_hi = _descend(
            b_hist_hi, prefix_hi, rank_hi, shift_hi, done_hi, RADIX_BITS, NUM_BINS
        )
        digit_shift -= RADIX_BITS

    for t_start in range(seg_start, seg_end, TILE):
        o_tok, m_in, m_valid, b_key = _tile_keys(
            values_ptr, valid_ptr, seg_start, seg_end, t_start, pos_bits, TILE, HAS_VALID
        )
        b_sel = _in_band(b_key, m_valid, prefix_lo, shift_lo, prefix_hi, shift_hi)
        tl.store(out_ptr + o_tok, b_sel.to(tl.uint8), mask=m_in)


# -------------------------------------------------------------------------------------------
# Schedule "chunked": one program per chunk, one launch per pass
# -------------------------------------------------------------------------------------------
# hist [n_passes, n_segments, 2, NUM_BINS] int32 (zeroed): pass p's digit counts for the
# lo and hi boundary (pass 0 uses only slot 0: both boundaries start from all keys).
# state [n_passes + 1, n_segments, 8] int64: (prefix, rank, shift, done) of lo then hi as
# used by pass p, written by the segment's first chunk, read by the next launch.


@triton.jit
def _segment_of_work(i_work, work_seg_ptr, chunks_per_seg, UNIFORM: tl.constexpr):
    return i_work // chunks_per_seg if UNIFORM else tl.load(work_seg_ptr + i_work).to(tl.int64)


@triton.jit
def _chunk_of_work(
    i_work,
    bounds_ptr,
    work_first_ptr,
    i_seg,
    seg_len,
    chunks_per_seg,
    CHUNK: tl.constexpr,
    UNIFORM: tl.constexpr,
):
    seg_start, seg_end = _segment_range(i_seg, bounds_ptr, seg_len, UNIFORM)
    # Uniform segments: work item = i_seg * chunks_per_seg + i_chunk. Otherwise the device
    # enumerated the work items and knows where each segment's first one is.
    i_chunk = i_work % chunks_per_seg if UNIFORM else i_work - tl.load(work_first_ptr + i_seg)
    return seg_start, seg_end, seg_start + i_chunk * CHUNK, i_chunk == 0


@triton.jit
def _current_boundaries(
    hist_ptr,
    state_ptr,
    i_seg,
    pass_idx,
    n_segments,
    n_passes,
    lo_bits,
    hi_bits,
    RADIX_BITS: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Boundary states for pass ``pass_idx`` >= 1: the previous pass's state descended by
    the previous pass's histograms."""
    o_bins = tl.arange(0, NUM_BINS)
    p_hist = hist_ptr + ((pass_idx - 1) * n_segments + i_seg) * (2 * NUM_BINS)
    b_hist_lo = tl.load(p_hist + o_bins)
    if pass_idx == 1:
        n = tl.sum(b_hist_lo, axis=0)
        top_shift = n_passes * RADIX_BITS
        prefix_lo, rank_lo, shift_lo, done_lo = _rank_boundary(n, lo_bits, top_shift)
        prefix_hi, rank_hi, shift_hi, done_hi = _rank_boundary(n, hi_bits, top_shift)
        b_hist_hi = b_hist_lo
    else:
        p_state = state_ptr + ((pass_idx - 1) * n_segments + i_seg) * 8
        prefix_lo = tl.load(p_state)
        rank_lo = tl.load(p_state + 1)
        shift_lo = tl.load(p_state + 2).to(tl.int32)
        done_lo = tl.load(p_state + 3) != 0
        prefix_hi = tl.load(p_state + 4)
        rank_hi = tl.load(p_state + 5)
        shift_hi = tl.load(p_state + 6).to(tl.int32)
        done_hi = tl.load(p_state + 7) != 0
        b_hist_hi = tl.load(p_hist + NUM_BINS + o_bins)
    prefix_lo, rank_lo, shift_lo, done_lo = _descend(
        b_hist_lo, prefix_lo, rank_lo, shift_lo, done_lo, RADIX_BITS, NUM_BINS
    )
    prefix_hi, rank_hi, shift_hi, done_hi = _descend(
        b_hist_hi, prefix_hi, rank_hi, shift_hi, done_hi, RADIX_BITS, NUM_BINS
    )
    return prefix_lo, rank_lo, shift_lo, done_lo, prefix_hi, rank_hi, shift_hi, done_hi


@triton.jit(
    do_not_specialize=[
        "seg_len",
        "chunks_per_seg",
        "n_segments",
        "pos_bits",
        "n_passes",
        "pass_idx",
        "lo_bits",
        "hi_bits",
    ]
)
def _band_chunk_pass_kernel(
    values_ptr,
    valid_ptr,
    bounds_ptr,
    work_seg_ptr,
    work_first_ptr,
    hist_ptr,
    state_ptr,
    seg_len,
    chunks_per_seg,
    n_segments,
    pos_bits,
    n_passes,
    pass_idx,
    lo_bits,
    hi_bits,
    HAS_VALID: tl.constexpr,
    UNIFORM: tl.constexpr,
    CHUNK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    i_work = tl.program_id(0).to(tl.int64)
    i_seg = _segment_of_work(i_work, work_seg_ptr, chunks_per_seg, UNIFORM)
    if i_seg >= n_segments:  # spare work item: the host only knows a bound on their number
        return
    seg_start, seg_end, chunk_start, is_first = _chunk_of_work(
        i_work, bounds_ptr, work_first_ptr, i_seg, seg_len, chunks_per_seg, CHUNK, UNIFORM
    )
    o_bins = tl.arange(0, NUM_BINS)
    p_hist = hist_ptr + (pass_idx * n_segments + i_seg) * (2 * NUM_BINS)
    digit_shift = (n_passes - 1 - pass_idx) * RADIX_BITS

    if pass_idx == 0:
        _, _, m_valid, b_key = _tile_keys(
            values_ptr, valid_ptr, seg_start, seg_end, chunk_start, pos_bits, CHUNK, HAS_VALID
        )
        b_hist = _histogram((b_key >> digit_shift).to(tl.int32), m_valid, NUM_BINS)
        tl.atomic_add(p_hist + o_bins, b_hist, mask=b_hist > 0, sem="relaxed")
    else:
        prefix_lo, rank_lo, shift_lo, done_lo, prefix_hi, rank_hi, shift_hi, done_hi = (
            _current_boundaries(
                hist_ptr,
                state_ptr,
                i_seg,
                pass_idx,
                n_segments,
                n_passes,
                lo_bits,
                hi_bits,
                RADIX_BITS,
                NUM_BINS,
            )
        )
        if is_first:
            p_state = state_ptr + (pass_idx * n_segments + i_seg) * 8
            tl.store(p_state, prefix_lo)
            tl.store(p_state + 1, rank_lo)
            tl.store(p_state + 2, shift_lo.to(tl.int64))
            tl.store(p_state + 3, done_lo.to(tl.int64))
            tl.store(p_state + 4, prefix_hi)
            tl.store(p_state + 5, rank_hi)
            tl.store(p_state + 6, shift_hi.to(tl.int64))
            tl.store(p_state + 7, done_hi.to(tl.int64))
        # Resolved segments read nothing more: the passes after the value bits cost one
        # state load per program unless there are ties at a boundary.
        if (done_lo & done_hi) == 0:
            _, _, m_valid, b_key = _tile_keys(
                values_ptr,
                valid_ptr,
                seg_start,
                seg_end,
                chunk_start,
                pos_bits,
                CHUNK,
                HAS_VALID,
            )
            b_digit = ((b_key >> digit_shift) & (NUM_BINS - 1)).to(tl.int32)
            if not done_lo:
                m_lo = m_valid & ((b_key >> shift_lo) == prefix_lo)
                b_hist = _histogram(b_digit, m_lo, NUM_BINS)
                tl.atomic_add(p_hist + o_bins, b_hist, mask=b_hist > 0, sem="relaxed")
            if not done_hi:
                m_hi = m_valid & ((b_key >> shift_hi) == prefix_hi)
                b_hist = _histogram(b_digit, m_hi, NUM_BINS)
                tl.atomic_add(p_hist + NUM_BINS + o_bins, b_hist, mask=b_hist > 0, sem="relaxed")


@triton.jit(
    do_not_specialize=[
        "seg_len",
        "chunks_per_seg",
        "n_segments",
        "pos_bits",
        "n_passes",
        "lo_bits",
        "hi_bits",
    ]
)
def _band_chunk_select_kernel(
    values_ptr,
    valid_ptr,
    bounds_ptr,
    work_seg_ptr,
    work_first_ptr,
    hist_ptr,
    state_ptr,
    out_ptr,
    seg_len,
    chunks_per_seg,
    n_segments,
    pos_bits,
    n_passes,
    lo_bits,
    hi_bits,
    HAS_VALID: tl.constexpr,
    UNIFORM: tl.constexpr,
    CHUNK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    i_work = tl.program_id(0).to(tl.int64)
    i_seg = _segment_of_work(i_work, work_seg_ptr, chunks_per_seg, UNIFORM)
    if i_seg >= n_segments:
        return
    seg_start, seg_end, chunk_start, _ = _chunk_of_work(
        i_work, bounds_ptr, work_first_ptr, i_seg, seg_len, chunks_per_seg, CHUNK, UNIFORM
    )
    prefix_lo, _, shift_lo, _, prefix_hi, _, shift_hi, _ = _current_boundaries(
        hist_ptr,
        state_ptr,
        i_seg,
        n_passes,
        n_segments,
        n_passes,
        lo_bits,
        hi_bits,
        RADIX_BITS,
        NUM_BINS,
    )
    o_tok, m_in, m_valid, b_key = _tile_keys(
        values_ptr, valid_ptr, seg_start, seg_end, chunk_start, pos_bits, CHUNK, HAS_VALID
    )
    b_sel = _in_band(b_key, m_valid, prefix_lo, shift_lo, prefix_hi, shift_hi)
    tl.store(out_ptr + o_tok, b_sel.to(tl.uint8), mask=m_in)
