"""Entropy-rank band selection: the launcher of the Triton band select.

The band rule (docs/design.md): inside a segment, sort the n valid tokens by (value, position)
and select rank r iff its quantile midpoint lies in the band, ``lo*n <= r + 0.5 < hi*n`` in
float64. The selected ranks are ``[first, stop)`` with ``first = ceil(fl(n*lo) - 0.5)`` and
``stop = ceil(fl(n*hi) - 0.5)``, computed on the device from n. The kernels find the keys of
those two ranks by a radix select over unique (value, position) keys, without sorting and
without the host ever reading n, the ranks or the boundaries.

Two schedules of the same select:

- ``segment``: one program per segment walks it in tiles, all passes in a single launch.
  For short segments (sequence scope), of which there are many.
- ``chunked``: one program per chunk of a segment; each pass is one launch whose programs add
  their chunk's histograms to the segment's with atomics, and the next launch descends. For
  long segments (group and batch scope, rows of 32768 tokens), which one program would
  walk alone.

Where the other parts live: ``radix`` (keys and the radix-select steps, ``@triton.jit``),
``kernels`` (the kernels of both schedules), ``config`` (the launch choice that the launcher
and the report share), ``plans`` (the benchmark launches that ``saei-fast kernels``
compiles, through ``benchmark_plans``).
"""

from __future__ import annotations

import torch
import triton

from saei_fast.kernels.band.config import (
    NUM_BINS,
    RADIX_BITS,
    SCHEDULES,
    band_config,
    float64_bits,
    layout_bits,
)
from saei_fast.kernels.band.kernels import (
    _band_chunk_pass_kernel,
    _band_chunk_select_kernel,
    _band_segment_kernel,
)
from saei_fast.kernels.plan import DEFAULT_OPTIONS, KernelOptions


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
    options: KernelOptions = DEFAULT_OPTIONS,
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
        options: the host's ``saei_fast.ops.dispatch.kernel_options()``; only the target
            CPU tensors are configured for matters here.

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

    pos_bits, n_passes = layout_bits(n_tokens, seg_len)
    config = band_config(
        options.target(values.device), n_tokens, n_segments, schedule=schedule, tile=tile
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
        enable_fp_fusion=False,  # see radix._band_rank
    )
    lo_bits, hi_bits = float64_bits(lo), float64_bits(hi)

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

    _select_chunked(
        (values, valid_bytes, bounds, out_bytes), seg_len, n_segments, pos_bits, n_passes,
        (lo_bits, hi_bits), config.tile, common,
    )  # fmt: skip
    return out


def _work_items(
    bounds: torch.Tensor | None, seg_len: int | None, n_tokens: int, n_segments: int, chunk: int
) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
    """``(chunks_per_seg, n_work, work_seg, work_first)``: the (segment, chunk) work items of
    the chunked schedule, ``chunks_per_seg`` of each segment when they are all ``seg_len``
    long, else listed per item on the device (segment and its first item)."""
    if bounds is None:
        chunks_per_seg = triton.cdiv(seg_len, chunk)
        return chunks_per_seg, n_segments * chunks_per_seg, None, None
    # Work items (segment, chunk) enumerated on the device: the host only knows that
    # there are at most N / chunk + S of them; the spare ones exit at once.
    lengths = (bounds[1:] - bounds[:-1]).clamp_min(0)
    chunks = (lengths + (chunk - 1)) // chunk
    work_end = torch.cumsum(chunks, 0)
    work_first = work_end - chunks
    n_work = triton.cdiv(n_tokens, chunk) + n_segments
    work_ids = torch.arange(n_work, device=bounds.device)
    work_seg = torch.searchsorted(work_end, work_ids, right=True)
    return 0, n_work, work_seg, work_first


def _select_chunked(tensors, seg_len, n_segments, pos_bits, n_passes, band_bits, chunk, common):
    """Schedule ``chunked``: one launch per radix pass, whose programs add their chunk's
    histograms to the segment's, then one launch that writes the selection."""
    values, valid_bytes, bounds, out_bytes = tensors
    lo_bits, hi_bits = band_bits
    device = values.device
    chunks_per_seg, n_work, work_seg, work_first = _work_items(
        bounds, seg_len, values.numel(), n_segments, chunk
    )
    # hist and state as laid out in kernels (schedule "chunked").
    hist = torch.zeros(n_passes, n_segments, 2, NUM_BINS, dtype=torch.int32, device=device)
    state = torch.empty(n_passes + 1, n_segments, 8, dtype=torch.int64, device=device)
    layout = (values, valid_bytes, bounds, work_seg, work_first, hist, state)
    sizes = (seg_len or 0, chunks_per_seg, n_segments, pos_bits, n_passes)
    for pass_idx in range(n_passes):
        _band_chunk_pass_kernel[(n_work,)](
            *layout, *sizes, pass_idx, lo_bits, hi_bits, CHUNK=chunk, **common
        )
    _band_chunk_select_kernel[(n_work,)](
        *layout, out_bytes, *sizes, lo_bits, hi_bits, CHUNK=chunk, **common
    )
