"""The radix-select building blocks of the band select (``@triton.jit`` helpers that both
schedules in ``kernels`` inline).

Keys. Every token gets a unique int64 key that orders it exactly as the band rule does: the
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
"""

from __future__ import annotations

import triton
import triton.language as tl


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
