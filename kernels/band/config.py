"""Launch configuration of the band select: one place that both the launcher
(``launch.band_select``) and ``benchmark_plans`` (``plans``, what ``saei-fast kernels``
compiles) read, so the report describes exactly what a launch runs.

* the key layout: ``RADIX_BITS`` per pass, ``layout_bits`` (position bits and passes);
* ``band_config(target, n_tokens, n_segments)``: schedule, tile / chunk size and warps;
* ``float64_bits``: how the band's bounds travel to the kernels.
"""

from __future__ import annotations

import dataclasses
import struct

import triton

from saei_fast.kernels.plan import Target

RADIX_BITS = 8
NUM_BINS = 1 << RADIX_BITS
VALUE_BITS = 32
# Keys are (value << pos_bits) | position < 2^62, so that 2^62 can stand above every key.
MAX_POSITION_BITS = 30
SCHEDULES = ("segment", "chunked")

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


def layout_bits(n_tokens: int, seg_len: int | None) -> tuple[int, int]:
    """``(pos_bits, n_passes)``: position bits of a key and radix passes over all its bits.
    Positions inside a segment are below its length, and the longest possible segment is
    known to the host without reading any data."""
    max_len = seg_len if seg_len is not None else n_tokens
    pos_bits = (max(max_len, 1) - 1).bit_length()
    if pos_bits > MAX_POSITION_BITS:
        raise ValueError(f"segments must hold fewer than 2^{MAX_POSITION_BITS} tokens")
    return pos_bits, triton.cdiv(VALUE_BITS + pos_bits, RADIX_BITS)


def float64_bits(value: float) -> int:
    """The bits of ``value`` as a float64, as an int: a float argument would reach the kernel
    as float32 (see ``radix._band_rank``)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]
