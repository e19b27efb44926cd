"""Token-selective entropy: the entropy-rank band mask and the SaEI objective.

``entropy_band_mask`` keeps the tokens whose entropy rank inside their scope falls in the band
(DESIGN.md's band rule); it is one ``torch.library`` custom op (bool output, no gradient)
that runs the Triton select on CUDA and a sort-based PyTorch path on the CPU.
``band_entropy_objective`` is the differentiable objective over that mask, in plain torch ops.

Layouts: padded ``entropy [B, T]`` with ``mask [B, T]``, or packed ``entropy [N]`` (all
sequences back to back, as padding-free trainers hold them) with ``cu_seqlens [S + 1]``.
Either way a scope is a contiguous run of the flattened tokens, which is how both
implementations see it: fixed-length runs (``seg_len``) or runs between offsets (``bounds``).
"""

from __future__ import annotations

import math

import torch

from saei_fast.ops.dispatch import resolve_impl
from saei_fast.validation import (
    check_band,
    check_choice,
    check_cu_seqlens,
    check_float_tensor,
    check_mask,
    check_no_nan,
    check_positive_int,
)

SCOPES = ("sequence", "group", "batch")

# -------------------------------------------------------------------------------------------
# Scopes as runs of the flat token array
# -------------------------------------------------------------------------------------------


def flat_segments(
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scope: str,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None, int | None, torch.Tensor | None]:
    """``(values [N], valid [N] or None, seg_len, bounds)``: the tokens flattened (contiguous)
    and the scopes as runs of them, either all ``seg_len`` long or between ``bounds``
    (``[S + 1]`` offsets, on the device). Exactly one of ``seg_len`` and ``bounds`` is set."""
    values = entropy.reshape(-1).contiguous()
    valid = None if mask is None else mask.reshape(-1).contiguous()
    n_tokens = values.numel()
    if scope == "batch":
        return values, valid, n_tokens, None
    if cu_seqlens is None:
        rows_per_segment = group_size if scope == "group" else 1
        return values, valid, rows_per_segment * entropy.shape[-1], None
    bounds = cu_seqlens[::group_size] if scope == "group" else cu_seqlens
    return values, valid, None, bounds


# -------------------------------------------------------------------------------------------
# PyTorch path: stable sorts and rank windows
# -------------------------------------------------------------------------------------------


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
    """Band-select ``values [N]`` scope by scope (see :func:`flat_segments`); bool ``[N]``.

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
    segment = _segment_ids(bounds, n_tokens)
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


def _segment_ids(bounds: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Segment index of each of the ``n_tokens`` tokens, from int64 offsets ``[S + 1]``
    (0 first): the number of segment ends at or before each position."""
    ends = torch.zeros(n_tokens + 1, dtype=torch.int64, device=bounds.device)
    ends.index_add_(0, bounds[1:], torch.ones_like(bounds[1:]))
    return ends[:n_tokens].cumsum(0)


# -------------------------------------------------------------------------------------------
# Custom op
# -------------------------------------------------------------------------------------------


@torch.library.custom_op("saei_fast::entropy_band_mask", mutates_args=())
def _band_mask_op(
    entropy: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    lo: float,
    hi: float,
    scope: str,
    group_size: int,
    impl: str,
) -> torch.Tensor:
    values, valid, seg_len, bounds = flat_segments(entropy, mask, cu_seqlens, scope, group_size)
    # float64 runs on the PyTorch path: the kernel ranks float32 keys, and rounding float64
    # values to float32 could merge distinct values into ties.
    if impl == "triton" and values.dtype != torch.float64:
        from saei_fast.kernels.band_select import band_select

        selected = band_select(values, valid, lo, hi, seg_len=seg_len, bounds=bounds)
    else:
        selected = band_mask_torch(values, valid, lo, hi, seg_len=seg_len, bounds=bounds)
    return selected.view(entropy.shape)


@_band_mask_op.register_fake
def _(entropy, mask, cu_seqlens, lo, hi, scope, group_size, impl):
    return torch.empty(entropy.shape, dtype=torch.bool, device=entropy.device)


# -------------------------------------------------------------------------------------------
# Public functions
# -------------------------------------------------------------------------------------------


def _check_layout(entropy: object, cu_seqlens: object) -> tuple[torch.Tensor, int]:
    """Entropy in one of the two layouts; returns it and its number of rows / sequences."""
    entropy = check_float_tensor("entropy", entropy)
    if cu_seqlens is None:
        if entropy.dim() != 2:
            raise ValueError(
                "entropy must be [B, T] (padded), or [N] with cu_seqlens (packed), got shape "
                f"{tuple(entropy.shape)} without cu_seqlens"
            )
        return entropy, entropy.shape[0]
    if entropy.dim() != 1:
        raise ValueError(
            f"with cu_seqlens, entropy must be packed [N], got shape {tuple(entropy.shape)}"
        )
    cu_seqlens = check_cu_seqlens(cu_seqlens, entropy.numel(), entropy, "entropy")
    return entropy, cu_seqlens.numel() - 1


def entropy_band_mask(
    entropy: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    band: tuple[float, float] = (1 / 3, 2 / 3),
    scope: str = "sequence",
    group_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Tokens whose entropy rank inside their scope lies in ``band``.

    Band rule: within a scope, sort the n valid tokens by (entropy ascending, flat position
    ascending) and select rank r iff its midpoint lies in the band, ``lo*n <= r + 0.5 <
    hi*n`` (in float64). The default band keeps the middle third (n = 1: its token; n = 2:
    none; n = 3: rank 1; n = 7: ranks 2 to 4); ``(0, 1)`` keeps every valid token,
    ``(2/3, 1)`` the top third, and the three thirds partition the tokens. Invalid (masked)
    tokens are never selected.

    Args:
        entropy: padded ``[B, T]``, or packed ``[N]`` with ``cu_seqlens``; float16 /
            bfloat16 / float32 / float64. Any values but NaN at valid positions (-inf and
            +inf rank first and last).
        mask: bool, shaped like ``entropy`` (True = real token), or None (all real).
        band: ``(lo, hi)`` with ``0 <= lo < hi <= 1``.
        scope: ``"sequence"`` (each row / packed sequence), ``"group"`` (each run of
            ``group_size`` consecutive rows / packed sequences: the responses to one prompt)
            or ``"batch"`` (all tokens).
        group_size: required for ``scope="group"`` and must divide the number of rows
            (sequences when packed); ignored by the other scopes.
        cu_seqlens: packed layout only: int32/int64 ``[S + 1]`` offsets, 0 first, ``N`` last,
            non-decreasing; sequence s is ``entropy[cu_seqlens[s]:cu_seqlens[s+1]]``.
        impl: ``"triton"``, ``"torch"`` or None (``SAEI_IMPL`` or automatic by device).
            float64 entropy always runs on the PyTorch path.

    Returns:
        bool tensor shaped like ``entropy`` (no gradient).

    Raises:
        TypeError: wrong types or dtypes.
        ValueError: wrong shapes, devices, band, scope or group_size; on CPU tensors also bad
            cu_seqlens or NaN at a valid position.

    Host synchronisation: none on a CUDA / ROCm device. There the two value checks (bad
    cu_seqlens, NaN at a valid position) run on the device (``torch._assert_async``): a
    violation fails the next synchronising CUDA call with a device-side assertion (whose
    message names the check) and leaves the CUDA context unusable, as any device-side
    assertion does. ``SAEI_SYNC_CHECKS=1`` makes them read the values on the host instead
    (one sync each) and raise the ``ValueError`` of the CPU. Under ``torch.compile`` both
    checks are skipped and NaN ranks above +inf (as in ``torch.sort``).
    """
    entropy, n_rows = _check_layout(entropy, cu_seqlens)
    mask = check_mask(mask, entropy.shape, entropy, "entropy")
    lo, hi = check_band(band)
    scope = check_choice("scope", scope, SCOPES)
    if scope == "group":
        group_size = check_positive_int("group_size", group_size)
        if n_rows % group_size:
            what = "sequences in cu_seqlens" if cu_seqlens is not None else "rows of entropy"
            raise ValueError(
                f"group_size must divide the number of {what} ({n_rows}), got {group_size}"
            )
    else:
        group_size = 1
    check_no_nan("entropy", entropy, mask)
    impl = resolve_impl(impl, entropy.device)
    return _band_mask_op(entropy.detach(), mask, cu_seqlens, lo, hi, scope, group_size, impl)


def band_entropy_objective(
    entropy: torch.Tensor,
    band_mask: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SaEI objective: the mean, over rows with at least one selected token, of the row's
    mean selected entropy (0 if no row has one).

    Args:
        entropy: padded ``[B, T]``, or packed ``[N]`` with ``cu_seqlens`` (rows are then the
            packed sequences); any float dtype, accumulated in float32 (float64 stays).
        band_mask: bool, shaped like ``entropy`` (e.g. from :func:`entropy_band_mask`).
            Unselected entries never reach the result or its gradient, whatever they hold.
        cu_seqlens: packed layout only, as in :func:`entropy_band_mask`.

    Returns:
        0-d tensor, differentiable w.r.t. ``entropy``; plain torch ops without data-dependent
        control flow, so it traces under ``torch.compile(fullgraph=True)``.

    Raises:
        TypeError / ValueError: wrong types, dtypes, shapes or devices; bad cu_seqlens (a
        value check that runs on the device for CUDA tensors, as in
        :func:`entropy_band_mask`, and is skipped under ``torch.compile``).
    """
    entropy, _ = _check_layout(entropy, cu_seqlens)
    band_mask = check_mask(band_mask, entropy.shape, entropy, "entropy", name="band_mask")
    if band_mask is None:
        raise TypeError("band_mask must be a torch.Tensor, got NoneType")
    values = entropy if entropy.dtype == torch.float64 else entropy.float()
    picked = torch.where(band_mask, values, 0.0)
    if cu_seqlens is None:
        counts = band_mask.sum(-1)
        row_means = picked.sum(-1) / counts.clamp_min(1)
        return row_means.sum() / (counts > 0).sum().clamp_min(1)
    # Packed: weight each selected token by 1 / (its sequence's selected count).
    offsets = cu_seqlens.long()
    running = torch.cat([offsets.new_zeros(1), band_mask.long().cumsum(0)])
    counts = running.index_select(0, offsets[1:]) - running.index_select(0, offsets[:-1])
    weights = 1.0 / counts.clamp_min(1).to(values.dtype)
    token_weights = weights.index_select(0, _segment_ids(offsets, entropy.numel()))
    return (picked * token_weights).sum() / (counts > 0).sum().clamp_min(1)
