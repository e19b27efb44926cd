"""Argument checks shared by the public ops.

Every check runs before any work and raises a ``TypeError`` (wrong kind of value) or a
``ValueError`` (right kind, wrong value) that names the argument, what was expected and what
was received.
"""

from __future__ import annotations

import math
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
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}"
        )
    if tensor.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(tensor.shape)}"
        )
    return tensor


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return temperature


def check_same_device(name: str, tensor: torch.Tensor, reference: torch.Tensor, ref_name: str):
    if tensor.device != reference.device:
        raise ValueError(
            f"{name} is on {tensor.device} but {ref_name} is on {reference.device}; "
            "move them to the same device"
        )


def check_mask(
    mask: object, token_shape: Sequence[int], reference: torch.Tensor, ref_name: str
) -> torch.Tensor | None:
    """A bool mask shaped like the token dims of ``reference`` (or None)."""
    if mask is None:
        return None
    mask = check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(
            f"mask must have shape {tuple(token_shape)} (the token dims of {ref_name}), "
            f"got {tuple(mask.shape)}"
        )
    check_same_device("mask", mask, reference, ref_name)
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
