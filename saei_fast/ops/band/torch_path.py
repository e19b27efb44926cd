"""The band op's PyTorch path: the band rule by stable sorts and rank windows, on any device
and in any float dtype (float64 compares exactly).

The scopes arrive as runs of the flat token array (``op.flat_segments``): rows of equal
length take one sort per row, scopes between offsets a second stable sort by segment.
"""

from __future__ import annotations

import math

import torch


def rank_window(n_valid, lo: float, hi: float):
    """``(first, stop)``: the band rule selects ranks ``first <= r < stop`` of ``n_valid``
    tokens (an int or an integer tensor; results of the same kind).

    Rank r is selected iff ``lo*n <= r + 0.5 < hi*n`` in float64, so ``first`` is the
    least r with ``r >= fl(lo*n) - 0.5``. That subtraction is exact for products >= 0.25
    (0.5 is a multiple of their ulp below 2^52) and lands in [-0.5, -0.25] below, where the
    ceiling is 0 either way: ``ceil(fl(n*lo) - 0.5)`` is exact. Same for ``stop``.
    """
    if isinstance(n_valid, int):
        return math.ceil(n_valid * lo - 0.5), math.ceil(n_valid * hi - 0.5)
    n_valid = n_valid.double()
    return (
        torch.ceil(n_valid * lo - 0.5).long(),
        torch.ceil(n_valid * hi - 0.5).long(),
    )


def band_mask_torch(
    values: torch.Tensor,
    valid: torch.Tensor | None,
    lo: float,
    hi: float,
    *,
    seg_len: int | None = None,
    bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Band-select ``values [N]`` scope by scope (see ``op.flat_segments``); bool ``[N]``.

    Any float dtype (float64 compares exactly); NaN ranks above +inf. No host
    synchronisation on a GPU; on the CPU, one read of the data picks the faster method.
    """
    n_tokens = values.numel()
    if n_tokens == 0:
        return torch.zeros(0, dtype=torch.bool, device=values.device)
    if bounds is None:
        rows = values.view(-1, seg_len)
        valid_rows = None if valid is None else valid.view(-1, seg_len)
        # The window method needs every masked-out token to sort after every valid one, which
        # fails only for a NaN at a valid position (possible under torch.compile, which skips
        # the NaN check). Reading the data to rule that out is free on the CPU only.
        if valid_rows is None or (
            values.device.type == "cpu" and not bool((valid_rows & rows.isnan()).any())
        ):
            return _band_rows_by_window(rows, valid_rows, lo, hi).view(-1)
        return _band_rows_by_count(rows, valid_rows, lo, hi).view(-1)
    return _band_segments_by_count(values, valid, bounds, lo, hi)


def _band_rows_by_window(
    rows: torch.Tensor, valid_rows: torch.Tensor | None, lo: float, hi: float
) -> torch.Tensor:
    """Equal-length scopes as rows ``[S, L]``, no NaN at a valid position: masked-out tokens
    become NaN, which a stable sort puts after every valid value, so the valid tokens take
    sorted places ``0..n-1`` in the rule's (value, position) order and the band is a window
    of sorted places. One sort, one comparison, one scatter: a bare per-row sort's work."""
    keyed = rows if valid_rows is None else rows.masked_fill(~valid_rows, math.nan)
    order = torch.sort(keyed, dim=-1, stable=True).indices
    n_valid = rows.shape[-1] if valid_rows is None else valid_rows.sum(-1, keepdim=True)
    first, stop = rank_window(n_valid, lo, hi)
    places = torch.arange(rows.shape[-1], device=rows.device)
    in_window = (places >= first) & (places < stop)
    if valid_rows is None:
        in_window = in_window.expand(rows.shape)
    return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device).scatter_(
        -1, order, in_window
    )


def _band_rows_by_count(
    rows: torch.Tensor, valid_rows: torch.Tensor, lo: float, hi: float
) -> torch.Tensor:
    """Equal-length scopes as rows ``[S, L]``, any values: a valid token's rank is the number
    of valid tokens before it in (value, position) order, a stable sort and a cumsum
    (masked-out tokens get unused ranks)."""
    by_value = torch.sort(rows, dim=-1, stable=True).indices
    before = valid_rows.gather(-1, by_value).long().cumsum(-1) - 1
    rank = torch.empty_like(by_value).scatter_(-1, by_value, before)
    first, stop = rank_window(valid_rows.sum(-1, keepdim=True), lo, hi)
    return valid_rows & (rank >= first) & (rank < stop)


def _band_segments_by_count(
    values: torch.Tensor,
    valid: torch.Tensor | None,
    bounds: torch.Tensor,
    lo: float,
    hi: float,
) -> torch.Tensor:
    """Scopes between offsets ``bounds [S + 1]``: a second stable sort by segment keeps the
    value order inside each segment; then subtract the valid tokens of earlier segments.
    Gathers are index_select and segment ids a cumsum: advanced indexing, searchsorted and
    repeat_interleave parallelise badly on a busy CPU."""
    n_tokens = values.numel()
    if valid is None:
        valid = torch.ones(n_tokens, dtype=torch.bool, device=values.device)
    bounds = bounds.to(torch.int64).contiguous()
    segment = segment_ids(bounds, n_tokens)
    by_value = torch.sort(values, stable=True).indices
    by_segment = torch.sort(segment.index_select(0, by_value), stable=True).indices
    order = by_value.index_select(0, by_segment)
    before = valid.index_select(0, order).long().cumsum(0) - 1
    running = torch.cat([segment.new_zeros(1), valid.long().cumsum(0)])  # valid before i
    first_valid = running.index_select(0, bounds[:-1])
    end_valid = running.index_select(0, bounds[1:])
    rank = torch.empty_like(order).scatter_(0, order, before)
    rank -= first_valid.index_select(0, segment)
    first, stop = rank_window((end_valid - first_valid).index_select(0, segment), lo, hi)
    return valid & (rank >= first) & (rank < stop)


def segment_ids(bounds: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Segment index of each of the ``n_tokens`` tokens, from int64 offsets ``[S + 1]``
    (0 first): the number of segment ends at or before each position."""
    ends = torch.zeros(n_tokens + 1, dtype=torch.int64, device=bounds.device)
    ends.index_add_(0, bounds[1:], torch.ones_like(bounds[1:]))
    return ends[:n_tokens].cumsum(0)
