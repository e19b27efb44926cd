"""Entropy-rank band selection: Triton kernels and their launchers.

The band rule (DESIGN.md): inside a segment, sort the n valid tokens by (value, position)
and select rank r iff its quantile midpoint lies in the band, ``lo*n <= r + 0.5 < hi*n`` in
float64. The selected ranks are ``[first, stop)`` with ``first = ceil(fl(n*lo) - 0.5)`` and
``stop = ceil(fl(n*hi) - 0.5)``, computed on the device from n (see ``_band_rank``).

Keys. Every token gets a unique int64 key that orders it exactly as the rule does: the
float32 bits mapped to an order-preserving 32-bit integer, then the token's position inside
its segment in the low ``pos_bits`` bits. Equal values are thus ordered by position, and the
token of rank k is the one holding the k-th smallest key. -0.0 gets the key of +0.0 (they
are equal values) and NaN ranks above +inf, as in ``torch.sort``; the ops layer rejects NaN
before calling here, so that order only matters under ``torch.compile``, where that check
is skipped.

Select without sorting. For each boundary rank (k_lo, k_hi) a radix select finds the key of
that rank 8 bits at a time, most significant first: histogram the next digit of the keys
that share the digits found so far, then descend into the bin that holds rank k. A boundary
is resolved as soon as its bin holds a single key (mostly after the value bits; ties need
the position bits). A token is selected iff its key is >= the k_lo key and < the k_hi key,
compared on the resolved prefix. n, the ranks and the boundaries never leave the device.

Two schedules of the same select:

- ``segment``: one program per segment walks it in tiles, all passes in a single launch.
  For short segments (sequence scope), of which there are many.
- ``chunked``: one program per chunk of a segment; each pass is one launch whose programs add
  their chunk's histogram to the segment's with atomics, and the next launch descends. For
  long segments (group and batch scope, rows of 32768 tokens), which one program would
  walk alone.
"""

from __future__ import annotations

import dataclasses
import struct

import torch
import triton
import triton.language as tl
from saei_fast.kernels._plan import TRITON_DTYPE, LaunchPlan, Target, target_for

RADIX_BITS = 8
NUM_BINS = 1 << RADIX_BITS
VALUE_BITS = 32
# Keys are (value << pos_bits) | position < 2^62, so that 2^62 can stand above every key.
MAX_POSITION_BITS = 30
SCHEDULES = ("segment", "chunked")

# -------------------------------------------------------------------------------------------
# Building blocks shared by both schedules
# -------------------------------------------------------------------------------------------


@triton.jit
def _order_keys(b_x, o_pos, pos_bits):
    """Unique int64 keys ordering tokens by (value, position inside the segment)."""
    b_bits = b_x.to(tl.float32).to(tl.int32, bitcast=True)
    # Integer tests, so that no floating-point simplification can change them.
    m_nan = (b_bits & 0x7FFFFFFF) > 0x7F800000
    b_bits = tl.where(b_bits == -2147483648, 0, b_bits)  # -0.0 -> +0.0
    # IEEE floats order like sign-magnitude integers: flipping the magnitude bits of the
    # negative ones makes signed int32 order equal float order, -inf < ... < +inf.
    b_bits = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits)
    b_bits = tl.where(m_nan, 0x7FFFFFFF, b_bits)
    b_key = b_bits.to(tl.int64) + 2147483648  # [0, 2^32): every digit is non-negative
    return (b_key << pos_bits) | o_pos


@triton.jit
def _tile_keys(
    values_ptr,
    valid_ptr,
    seg_start,
    seg_end,
    t_start,
    pos_bits,
    TILE: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    """Keys of the tile at ``t_start``, with the in-segment and the valid-token masks."""
    o_tok = t_start + tl.arange(0, TILE).to(tl.int64)
    m_in = o_tok < seg_end
    b_x = tl.load(values_ptr + o_tok, mask=m_in, other=0.0)
    m_valid = m_in
    if HAS_VALID:
        m_valid = m_in & (tl.load(valid_ptr + o_tok, mask=m_in, other=0) != 0)
    return o_tok, m_in, m_valid, _order_keys(b_x, o_tok - seg_start, pos_bits)


@triton.jit
def _histogram(b_digit, m_count, NUM_BINS: tl.constexpr):
    """Counts of ``b_digit`` (int32 in [0, NUM_BINS)) over the lanes where ``m_count``."""
    # tl.histogram takes no mask before Triton 3.2: count left-out lanes as digit 0, then
    # take them back out of bin 0.
    b_hist = tl.histogram(tl.where(m_count, b_digit, 0), NUM_BINS)
    n_left_out = tl.sum(tl.where(m_count, 0, 1), axis=0)
    return b_hist - tl.where(tl.arange(0, NUM_BINS) == 0, n_left_out, 0)


@triton.jit
def _band_rank(n, band_bits):
    """The first rank whose midpoint reaches ``band * n``: ``ceil(fl(n * band) - 0.5)``.

    ``fl(n * band) - 0.5`` is exact for products >= 0.25 (0.5 is a multiple of their ulp
    below 2^52) and lies in [-0.5, -0.25] below that, where the ceiling is 0 either way, so
    rank r >= the result iff ``r + 0.5 >= fl(n * band)``: the rule's comparison, exactly.
    """
    # The band arrives as the bits of a float64 (a plain float argument would be float32) and
    # the launch disables FMA contraction: n * band is rounded on its own, as in Python.
    band = band_bits.to(tl.int64).to(tl.float64, bitcast=True)
    t = n.to(tl.float64) * band - 0.5
    # Truncation is the floor for t >= 0 and 0 on (-1, 0); one step up where t is not whole
    # makes it the ceiling without relying on a float64 ceil in every backend.
    rank = t.to(tl.int64)
    return rank + (rank.to(tl.float64) < t).to(tl.int64)


@triton.jit
def _rank_boundary(n, band_bits, top_shift):
    """Radix-select state for the boundary rank ``_band_rank(n, band)``.

    State: (prefix, rank, shift, done). The boundary key's bits at and above ``shift`` are
    ``prefix``; ``rank`` is the boundary's rank among the keys sharing that prefix; ``done``
    once the prefix alone decides every comparison with the boundary.
    """
    rank = _band_rank(n, band_bits)
    past_end = rank >= n  # no token reaches this rank: key 2^62 lies above every key
    at_start = rank <= 0  # every token reaches it: prefix 0 of the top bits, below all keys
    prefix = tl.where(past_end, 4611686018427387904, 0).to(tl.int64)
    shift = tl.where(past_end, 0, tl.where(at_start, 62, top_shift))
    return prefix, rank, shift, past_end | at_start


@triton.jit
def _descend(b_hist, prefix, rank, shift, done, RADIX_BITS: tl.constexpr, NUM_BINS: tl.constexpr):
    """One radix-select step: move into the bin of ``b_hist`` (next-digit counts of the keys
    sharing ``prefix``) that holds ``rank``. Resolved boundaries stay as they are."""
    o_bins = tl.arange(0, NUM_BINS)
    b_cum = tl.cumsum(b_hist, axis=0)
    digit = tl.sum((b_cum <= rank).to(tl.int32), axis=0)
    below = tl.sum(tl.where(o_bins < digit, b_hist, 0), axis=0)
    count = tl.sum(tl.where(o_bins == digit, b_hist, 0), axis=0)
    prefix = tl.where(done, prefix, (prefix << RADIX_BITS) | digit)
    rank = tl.where(done, rank, rank - below)
    shift = tl.where(done, shift, shift - RADIX_BITS)
    # Keys are unique, so a bin of one key is the boundary itself: its prefix decides.
    return prefix, rank, shift, done | (count <= 1)


@triton.jit
def _in_band(b_key, m_valid, prefix_lo, shift_lo, prefix_hi, shift_hi):
    return m_valid & ((b_key >> shift_lo) >= prefix_lo) & ((b_key >> shift_hi) < prefix_hi)


@triton.jit
def _segment_range(i_seg, bounds_ptr, seg_len, UNIFORM: tl.constexpr):
    if UNIFORM:
        seg_start = i_seg * seg_len
        seg_end = seg_start + seg_len
    else:
        seg_start = tl.load(bounds_ptr + i_seg).to(tl.int64)
        seg_end = tl.load(bounds_ptr + i_seg + 1).to(tl.int64)
    return seg_start, seg_end


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


# -------------------------------------------------------------------------------------------
# Configuration: one choice for the launcher and the compile-time report
# -------------------------------------------------------------------------------------------

_MAX_TILE = 4096
# Chunks are not cut below this to fill the GPU: each chunk still pays for its own
# histograms and atomics.
_MIN_CHUNK = 1024
# Mean segment length above which one program per segment leaves the GPU mostly idle.
_SEGMENT_SCHEDULE_MAX_LEN = 8192
# Tokens per thread at which a tile's histograms and keys fit the registers of every target
# without spills (checked by compiling for sm_90, sm_80, gfx942 and gfx90a).
_TOKENS_PER_THREAD = 8


@dataclasses.dataclass(frozen=True)
class BandConfig:
    """How a band select is launched: schedule, tokens per tile or chunk, warps."""

    schedule: str
    tile: int
    num_warps: int


def band_config(
    target: Target,
    n_tokens: int,
    n_segments: int,
    *,
    schedule: str | None = None,
    tile: int | None = None,
) -> BandConfig:
    """The launch configuration for ``n_tokens`` split into ``n_segments`` scopes on
    ``target``; ``schedule`` / ``tile`` force one (tests cross tile edges with small ones)."""
    mean_len = triton.cdiv(max(n_tokens, 1), max(n_segments, 1))
    if schedule is None:
        schedule = "segment" if mean_len <= _SEGMENT_SCHEDULE_MAX_LEN else "chunked"
    if tile is None:
        # A tile about one segment long (longer segments take several): short packed
        # sequences do not each get a mostly-masked 4096-token tile.
        tile = min(_MAX_TILE, max(16, triton.next_power_of_2(mean_len)))
        if schedule == "chunked":
            # Halve the chunks until every SM has two of them (or the chunks get small).
            while tile > _MIN_CHUNK and n_segments * triton.cdiv(mean_len, tile) < (
                2 * target.sm_count
            ):
                tile //= 2
    # Warps of 32 threads on NVIDIA, wavefronts of 64 on AMD: the same tokens per thread.
    num_warps = max(1, min(8, tile // (_TOKENS_PER_THREAD * target.warp_size)))
    return BandConfig(schedule, tile, num_warps)


def _layout_bits(n_tokens: int, seg_len: int | None) -> tuple[int, int]:
    """``(pos_bits, n_passes)``: position bits of a key and radix passes over all its bits.
    Positions inside a segment are below its length, and the longest possible segment is
    known to the host without reading any data."""
    max_len = seg_len if seg_len is not None else n_tokens
    pos_bits = (max(max_len, 1) - 1).bit_length()
    if pos_bits > MAX_POSITION_BITS:
        raise ValueError(f"segments must hold fewer than 2^{MAX_POSITION_BITS} tokens")
    return pos_bits, triton.cdiv(VALUE_BITS + pos_bits, RADIX_BITS)


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


# -------------------------------------------------------------------------------------------
# Launcher
# -------------------------------------------------------------------------------------------


def band_select(
    values: torch.Tensor,
    valid: torch.Tensor | None,
    lo: float,
    hi: float,
    *,
    seg_len: int | None = None,
    bounds: torch.Tensor | None = None,
    schedule: str | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Band-select ``values [N]`` segment by segment; returns a bool ``[N]``.

    Args:
        values: contiguous float16 / bfloat16 / float32 ``[N]``.
        valid: contiguous bool ``[N]`` (True = real token) or None (all valid).
        lo, hi: the band, ``0 <= lo < hi <= 1`` (checked by the caller).
        seg_len: segments are the consecutive runs of ``seg_len`` tokens (``N % seg_len == 0``).
        bounds: otherwise, int32/int64 ``[S + 1]`` flat offsets: segment s is
            ``[bounds[s], bounds[s+1])``; read on the device only. Exactly one of the two.
        schedule: ``"segment"`` or ``"chunked"`` (None: :func:`band_config`'s choice).
        tile: tokens per tile / chunk, a power of two >= 16 (tests use small ones to cross
            tile edges); None: :func:`band_config`'s choice.

    Never synchronises with the host. Tokens outside every segment (only with inconsistent
    ``bounds``) are not selected.
    """
    if (seg_len is None) == (bounds is None):
        raise ValueError("give exactly one of seg_len and bounds")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if tile is not None and (tile < 16 or tile & (tile - 1)):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    n_tokens = values.numel()
    uniform = bounds is None
    n_segments = (n_tokens // seg_len if seg_len else 0) if uniform else bounds.numel() - 1
    out = torch.zeros(n_tokens, dtype=torch.bool, device=values.device)
    if n_tokens == 0 or n_segments == 0:
        return out

    pos_bits, n_passes = _layout_bits(n_tokens, seg_len)
    config = band_config(
        target_for(values.device), n_tokens, n_segments, schedule=schedule, tile=tile
    )
    if not uniform:
        bounds = bounds.to(torch.int64).contiguous()
    valid_bytes = None if valid is None else valid.view(torch.uint8)
    out_bytes = out.view(torch.uint8)
    common = dict(
        HAS_VALID=valid is not None,
        UNIFORM=uniform,
        RADIX_BITS=RADIX_BITS,
        NUM_BINS=NUM_BINS,
        num_warps=config.num_warps,
        enable_fp_fusion=False,  # see _band_rank
    )
    lo_bits, hi_bits = _float64_bits(lo), _float64_bits(hi)

    if config.schedule == "segment":
        _band_segment_kernel[(n_segments,)](
            values,
            valid_bytes,
            bounds,
            out_bytes,
            seg_len or 0,
            pos_bits,
            n_passes,
            lo_bits,
            hi_bits,
            TILE=config.tile,
            **common,
        )
        return out

    chunk = config.tile
    if uniform:
        chunks_per_seg = triton.cdiv(seg_len, chunk)
        n_work = n_segments * chunks_per_seg
        work_seg = work_first = None
    else:
        # Work items (segment, chunk) enumerated on the device: the host only knows that
        # there are at most N / chunk + S of them; the spare ones exit at once.
        chunks_per_seg = 0
        lengths = (bounds[1:] - bounds[:-1]).clamp_min(0)
        chunks = (lengths + (chunk - 1)) // chunk
        work_end = torch.cumsum(chunks, 0)
        work_first = work_end - chunks
        n_work = triton.cdiv(n_tokens, chunk) + n_segments
        work_ids = torch.arange(n_work, device=values.device)
        work_seg = torch.searchsorted(work_end, work_ids, right=True)
    hist = torch.zeros(n_passes, n_segments, 2, NUM_BINS, dtype=torch.int32, device=values.device)
    state = torch.empty(n_passes + 1, n_segments, 8, dtype=torch.int64, device=values.device)
    layout = (values, valid_bytes, bounds, work_seg, work_first, hist, state)
    sizes = (seg_len or 0, chunks_per_seg, n_segments, pos_bits, n_passes)
    for pass_idx in range(n_passes):
        _band_chunk_pass_kernel[(n_work,)](
            *layout, *sizes, pass_idx, lo_bits, hi_bits, CHUNK=chunk, **common
        )
    _band_chunk_select_kernel[(n_work,)](
        *layout, out_bytes, *sizes, lo_bits, hi_bits, CHUNK=chunk, **common
    )
    return out


# -------------------------------------------------------------------------------------------
# Launch plans for the compile-time report
# -------------------------------------------------------------------------------------------

# The benchmark shapes (saei_fast.benchmarks.band_cases): 64 responses of 4096 tokens and 16 of
# 16384, float32 entropy (what the entropy ops return) with a right-padded bool mask, at each
# scope; group scope with 4 responses per prompt, as the benchmark.
BENCHMARK_SHAPES = ((64, 4096), (16, 16384))
BENCHMARK_GROUP_SIZE = 4
BENCHMARK_BAND = (1 / 3, 2 / 3)


def _int_type(value: int) -> str:
    """Triton's type for a Python int argument (as the JIT infers it at launch)."""
    return "i32" if -(2**31) <= value < 2**31 else "i64"


def _plan(kernel, role, target_shape, config, constexprs, runtime, **fields) -> LaunchPlan:
    """A plan whose signature lists ``kernel``'s runtime arguments in order: pointers from
    ``runtime`` (dtype or type string), ints typed by value."""
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        value = runtime[name]
        if isinstance(value, torch.dtype):
            signature[name] = "*" + TRITON_DTYPE[value]
        else:
            signature[name] = _int_type(value)
    pointers = tuple(name for name in signature if signature[name].startswith("*"))
    return LaunchPlan(
        op="band",
        kernel=kernel,
        role=role,
        dtype=torch.float32,
        shape=target_shape,
        signature=signature,
        constexprs=constexprs,
        # Fresh torch allocations: every pointer is 16-byte aligned. The int arguments are
        # all in do_not_specialize (lengths change every batch), so none is specialised.
        aligned=pointers,
        num_warps=config.num_warps,
        num_stages=3,
        flops=0,
        **fields,
    )


def benchmark_plans(target: Target) -> list[LaunchPlan]:
    """The launches :func:`band_select` makes for the benchmark shapes on ``target``, per
    scope, through :func:`band_config`. ``bytes_moved`` counts the compulsory traffic of one
    launch (entropy and mask read once, the selection written once); the radix passes
    re-read a segment or chunk that stays in L1/L2, which ``extra`` records."""
    plans = []
    lo_bits, hi_bits = (_float64_bits(b) for b in BENCHMARK_BAND)
    for rows, width in BENCHMARK_SHAPES:
        n_tokens = rows * width
        for scope, seg_len in (
            ("sequence", width),
            ("group", BENCHMARK_GROUP_SIZE * width),
            ("batch", n_tokens),
        ):
            n_segments = n_tokens // seg_len
            config = band_config(target, n_tokens, n_segments)
            pos_bits, n_passes = _layout_bits(n_tokens, seg_len)
            shape = {"B": rows, "T": width}
            constexprs = {
                "HAS_VALID": True,
                "UNIFORM": True,
                "RADIX_BITS": RADIX_BITS,
                "NUM_BINS": NUM_BINS,
                "bounds_ptr": None,
                "work_seg_ptr": None,
                "work_first_ptr": None,
            }
            runtime = {
                "values_ptr": torch.float32,
                "valid_ptr": torch.uint8,
                "out_ptr": torch.uint8,
                "hist_ptr": torch.int32,
                "state_ptr": torch.int64,
                "seg_len": seg_len,
                "pos_bits": pos_bits,
                "n_passes": n_passes,
                "lo_bits": lo_bits,
                "hi_bits": hi_bits,
                "n_segments": n_segments,
            }
            extra = {
                "scope": scope,
                "schedule": config.schedule,
                "radix_passes": n_passes,
                "options": {"enable_fp_fusion": False},  # as band_select launches
            }
            read_bytes = n_tokens * (4 + 1)  # float32 entropy + bool mask
            if config.schedule == "segment":
                plans.append(
                    _plan(
                        _band_segment_kernel,
                        "select",
                        shape,
                        config,
                        {**constexprs, "TILE": config.tile},
                        runtime,
                        grid=(n_segments,),
                        loop_elements=config.tile,
                        bytes_moved=read_bytes + n_tokens,
                        # histogram passes until both boundaries resolve, then the select
                        extra={**extra, "max_reads_per_token": n_passes + 1},
                    )
                )
                continue
            chunks_per_seg = triton.cdiv(seg_len, config.tile)
            n_work = n_segments * chunks_per_seg
            chunk_runtime = {**runtime, "chunks_per_seg": chunks_per_seg, "pass_idx": 0}
            chunk_constexprs = {**constexprs, "CHUNK": config.tile}
            hist_bytes = n_work * 2 * NUM_BINS * 4  # atomics of every chunk's histograms
            plans.append(
                _plan(
                    _band_chunk_pass_kernel,
                    "histogram pass",
                    shape,
                    config,
                    chunk_constexprs,
                    chunk_runtime,
                    grid=(n_work,),
                    loop_elements=config.tile,
                    bytes_moved=read_bytes + hist_bytes,
                    # one launch per radix pass; passes after the boundaries resolve read
                    # one state record per chunk
                    extra={**extra, "launches": n_passes},
                )
            )
            plans.append(
                _plan(
                    _band_chunk_select_kernel,
                    "select",
                    shape,
                    config,
                    chunk_constexprs,
                    chunk_runtime,
                    grid=(n_work,),
                    loop_elements=config.tile,
                    bytes_moved=read_bytes + n_tokens,
                    extra={**extra, "launches": 1},
                )
            )
    return plans
