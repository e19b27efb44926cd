"""Argument validation for the whole package: the ops, pixel spaces, attack, rollout and
integrations all check their inputs here.

Every check runs before any work and raises a ``TypeError`` (wrong kind of value) or a
``ValueError`` (right kind, wrong value) that names the argument, what was expected and what
was received.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value: object, *, min_dim: int = 0) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if tensor.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(tensor.shape)}"
        )
    return tensor


MIN_TEMPERATURE = 1.0 / (2.0**128 - 2.0**103)


def check_temperature(temperature: object) -> float:
    """A temperature > 0 whose inverse is finite in float32: the kernels multiply by 1/T in
    fp32, so T = 1e-39 (1/T overflows to inf) would turn every entropy into NaN."""
    value = check_positive_float("temperature", temperature)
    if not math.isfinite(float(torch.tensor(1.0 / value, dtype=torch.float32))):
        # The exact limit is 1 / (2**128 - 2**103), the reciprocal of the halfway point
        # above float32's largest value (1/T rounds to inf from there), about 2.9387e-39.
        raise ValueError(
            f"temperature must be at least 1 / (2**128 - 2**103) = {MIN_TEMPERATURE:.5e} so "
            f"that 1/temperature rounds to a finite float32, got {value}"
        )
    return value


def check_same_device(name: str, tensor: torch.Tensor, reference: torch.Tensor, ref_name: str):
    if tensor.device != reference.device:
        raise ValueError(
            f"{name} is on {tensor.device} but {ref_name} is on {reference.device}; "
            "move them to the same device"
        )


def check_same_dtype(name: str, tensor: torch.Tensor, reference: torch.Tensor, ref_name: str):
    if tensor.dtype != reference.dtype:
        raise TypeError(
            f"{name} must have the dtype of {ref_name} ({reference.dtype}), got {tensor.dtype}"
        )


def check_mask(
    mask: object,
    token_shape: Sequence[int],
    reference: torch.Tensor,
    ref_name: str,
    *,
    name: str = "mask",
) -> torch.Tensor | None:
    """A bool mask shaped like the token dims of ``reference`` (or None)."""
    if mask is None:
        return None
    mask = check_tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(
            f"{name} must have shape {tuple(token_shape)} (the token dims of {ref_name}), "
            f"got {tuple(mask.shape)}"
        )
    check_same_device(name, mask, reference, ref_name)
    return mask


def check_labels(
    labels: object,
    token_shape: Sequence[int],
    vocab_size: int,
    mask: torch.Tensor | None,
    reference: torch.Tensor,
    ref_name: str,
) -> torch.Tensor:
    """Integer labels shaped like the token dims, in ``[0, vocab_size)`` where unmasked.

    The range check reads the labels (one host sync on a GPU). It is skipped while
    ``torch.compile`` traces, where the kernels instead return NaN log-probs for
    out-of-range labels, so a bad label is never silently turned into a number.
    """
    labels = check_tensor("labels", labels)
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be an int32 or int64 tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(token_shape):
        raise ValueError(
            f"labels must have shape {tuple(token_shape)} (the token dims of {ref_name}), "
            f"got {tuple(labels.shape)}"
        )
    check_same_device("labels", labels, reference, ref_name)
    if labels.numel() and not torch.compiler.is_compiling():
        out_of_range = (labels < 0) | (labels >= vocab_size)
        if mask is not None:
            out_of_range &= mask
        if bool(out_of_range.any()):
            bad = labels[out_of_range][:5].tolist()
            raise ValueError(
                f"labels must lie in [0, {vocab_size}) at unmasked positions, got values "
                f"such as {bad}; mask out padding (e.g. -100) with mask=..."
            )
    return labels


def check_positive_float(name: str, value: object) -> float:
    """A finite Python number > 0 (bool is rejected), returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_positive_int(name: str, value: object) -> int:
    """A Python int >= 1 (bool is rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_non_negative_float(name: str, value: object) -> float:
    """A finite Python number >= 0 (bool is rejected), returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_band(band: object) -> tuple[float, float]:
    """A pair ``(lo, hi)`` of Python numbers with ``0 <= lo < hi <= 1``, returned as floats."""
    if not isinstance(band, (tuple, list)) or len(band) != 2:
        raise TypeError(f"band must be a pair (lo, hi) of floats, got {band!r}")
    for value in band:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"band must hold two floats, got {type(value).__name__} in {band!r}")
    lo, hi = float(band[0]), float(band[1])
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"band must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
    return lo, hi


def checks_on_device(tensor: torch.Tensor) -> bool:
    """Whether value checks of ``tensor`` run on its device instead of the host: CUDA / ROCm
    tensors, unless ``SAEI_SYNC_CHECKS=1`` asks for host checks (one sync each, the CPU's
    ``ValueError``) while debugging."""
    return tensor.device.type == "cuda" and os.environ.get("SAEI_SYNC_CHECKS", "0") == "0"


def check_no_nan(name: str, values: torch.Tensor, mask: torch.Tensor | None) -> None:
    """No NaN where ``mask`` is True (everywhere when None).

    CPU tensors: a ``ValueError`` naming the first NaN. CUDA tensors (see
    :func:`checks_on_device`): a device-side assertion, no host sync; a violation fails the
    next synchronising call. Skipped while ``torch.compile`` traces.
    """
    if values.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = torch.isnan(values)
    if mask is not None:
        bad &= mask
    if checks_on_device(values):
        torch._assert_async(~bad.any(), f"saei_fast: {name} must not be NaN at valid positions")
        return
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} must not be NaN at valid positions, got NaN at index {where} "
            f"(and {int(bad.sum()) - 1} more); mask out such tokens with mask=..."
        )


def check_cu_seqlens(cu_seqlens: object, numel: int, reference: torch.Tensor, ref_name: str):
    """Packed-layout offsets: int32/int64 ``[S + 1]``, starting at 0, non-decreasing, ending
    at ``numel`` (the token count of ``ref_name``).

    The value checks raise a ``ValueError`` for CPU tensors and run as a device-side
    assertion for CUDA tensors (no host sync; see :func:`checks_on_device`); they are
    skipped while ``torch.compile`` traces.
    """
    cu_seqlens = check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least one offset, got shape {tuple(cu_seqlens.shape)}"
        )
    check_same_device("cu_seqlens", cu_seqlens, reference, ref_name)
    if torch.compiler.is_compiling():
        return cu_seqlens
    bad = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != numel) | (cu_seqlens.diff() < 0).any()
    if checks_on_device(cu_seqlens):
        torch._assert_async(
            ~bad, f"saei_fast: cu_seqlens must start at 0, be non-decreasing and end at {numel}"
        )
        return cu_seqlens
    if bool(bad):
        offsets = cu_seqlens.tolist()
        shown = offsets if len(offsets) <= 8 else [*offsets[:4], "...", *offsets[-3:]]
        raise ValueError(
            f"cu_seqlens must start at 0, be non-decreasing and end at {numel} (the number of "
            f"tokens of {ref_name}), got {shown}"
        )
    return cu_seqlens
