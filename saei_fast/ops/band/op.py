"""Token-selective entropy: the entropy-rank band mask and the SaEI objective.

``entropy_band_mask`` keeps the tokens whose entropy rank inside their scope falls in the band
(docs/design.md's band rule); it is one ``torch.library`` custom op (bool output, no gradient)
that runs the Triton select on CUDA (``triton_path``) and a sort-based PyTorch path on the
CPU (``torch_path``).
``band_entropy_objective`` is the differentiable objective over that mask, in plain torch ops.

Layouts: padded ``entropy [B, T]`` with ``mask [B, T]``, or packed ``entropy [N]`` (all
sequences back to back, as padding-free trainers hold them) with ``cu_seqlens [S + 1]``.
Either way a scope is a contiguous run of the flattened tokens, which is how both
implementations see it: fixed-length runs (``seg_len``) or runs between offsets (``bounds``).
"""

from __future__ import annotations

import torch

from saei_fast.ops.band import torch_path, triton_path
from saei_fast.ops.dispatch import op_impl
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
    band_mask = triton_path.band_mask_triton if impl == "triton" else torch_path.band_mask_torch
    selected = band_mask(values, valid, lo, hi, seg_len=seg_len, bounds=bounds)
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
    # float64 runs on the PyTorch path (op_impl): the kernel ranks float32 keys, and rounding
    # float64 values to float32 could merge distinct values into ties.
    impl = op_impl(impl, entropy)
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
    token_weights = weights.index_select(0, torch_path.segment_ids(offsets, entropy.numel()))
    return (picked * token_weights).sum() / (counts > 0).sum().clamp_min(1)
