"""What every pixel space shares: the per-channel map between a model's normalized
``pixel_values`` and images in [0, 1], the signed step, the projection and PIL conversion.

A space only has to say how its layout views as ``[M, C, K]`` (M pieces, C channels, K values
per channel and piece); the arithmetic below works on that view, so the two layouts (Qwen
flattened patches, plain image tensors) share one implementation of the step and the
projection. Conversions run in float64 and are cast back to the input's dtype, so a round
trip through [0, 1] and back reproduces float32 ``pixel_values`` up to float32 rounding.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from saei_fast.validation import check_float_tensor, check_positive_float, check_same_device

if TYPE_CHECKING:
    from PIL import Image

# Processors turn uint8 pixels into [0, 1] with this factor before normalizing; [0, 1] units
# (alpha, eps) and the PIL conversion rely on it.
UINT8_SCALE = 1.0 / 255.0


class PixelSpace(abc.ABC):
    """Base class: normalization constants and the layout-independent arithmetic.

    Args:
        mean, std: per-channel normalization of the processor (``(x - mean) / std`` with
            ``x`` in [0, 1]); one float is used for every channel.
        channels: number of image channels (defaults to ``len(mean)`` or 3).
    """

    #: keyword fields (besides ``pixel_values``) that locate the images in a batch
    image_fields: tuple[str, ...] = ()

    def __init__(
        self,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        *,
        channels: int | None = None,
    ) -> None:
        self.mean = _per_channel("mean", mean, channels)
        self.std = _per_channel("std", std, len(self.mean))
        for value in self.std:
            check_positive_float("std", value)
        self.channels = len(self.mean)

    # ---------------------------------------------------------------------------------------
    # Layout hooks (subclasses)
    # ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    def _check_layout(self, pixel_values: torch.Tensor, fields: dict) -> None:
        """Raise if ``pixel_values`` and the fields do not describe a valid batch."""

    @abc.abstractmethod
    def _channel_view(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (shaped like ``pixel_values``) viewed as ``[M, C, K]``."""

    def _tie_gradient(self, grad_view: torch.Tensor) -> torch.Tensor:
        """The gradient the step's sign is taken from, ``[M, C, K]``: positions that must
        move together (Qwen's temporal copies) get their summed gradient."""
        return grad_view

    def _valid_view(self, pixel_values: torch.Tensor, fields: dict) -> torch.Tensor | None:
        """Bool ``[M, 1, K]``: True where a value is a real pixel (None: all are)."""
        return None

    @abc.abstractmethod
    def entry_spans(self, pixel_values: torch.Tensor, **fields) -> list[tuple[int, int]]:
        """``[start, stop)`` along dim 0 of ``pixel_values`` of each entry (an image, or a
        row's images), in order; the attack cuts batches into rows with it."""

    @abc.abstractmethod
    def entry_tokens(self, **fields) -> list[int] | None:
        """Image placeholder tokens of each entry in ``input_ids`` (None: all alike)."""

    # ---------------------------------------------------------------------------------------
    # Public methods
    # ---------------------------------------------------------------------------------------

    def step(
        self, pixel_values: torch.Tensor, grad: torch.Tensor, alpha: float, **fields
    ) -> torch.Tensor:
        """``pixel_values`` moved by ``alpha * sign(grad)`` in [0, 1] units.

        In normalized space the move is ``alpha / std[c]`` per channel. Zero gradient moves
        nothing; padding (where the space knows it) never moves. The result may leave the
        valid range: :meth:`project` clips it.

        Args:
            pixel_values: the model's pixel values (float tensor, this space's layout).
            grad: gradient of the objective to increase, shaped like ``pixel_values``.
            alpha: step in [0, 1] units (e.g. ``2/255``), > 0.
            **fields: this space's :attr:`image_fields`.

        Returns:
            A new tensor shaped like ``pixel_values``, in its dtype.

        Raises:
            TypeError / ValueError: wrong tensor types, shapes, fields or ``alpha <= 0``;
                non-finite ``pixel_values`` or NaN in ``grad``.
        """
        pixel_values = check_float_tensor("pixel_values", pixel_values)
        grad = check_float_tensor("grad", grad)
        _check_same_shape("grad", grad, "pixel_values", pixel_values)
        alpha = check_positive_float("alpha", alpha)
        fields = self._fields(fields)
        self._check_layout(pixel_values, fields)
        # sign(NaN) is NaN: a NaN gradient or pixel would silently poison the image.
        _check_finite("pixel_values", pixel_values)
        _check_not_nan("grad", grad)
        direction = self._tie_gradient(self._channel_view(grad).double()).sign()
        valid = self._valid_view(pixel_values, fields)
        if valid is not None:
            direction = direction * valid
        delta = direction * (alpha / self._std(pixel_values.device))
        moved = self._channel_view(pixel_values).double() + delta
        return moved.to(pixel_values.dtype).reshape(pixel_values.shape)

    def project(
        self,
        adv: torch.Tensor,
        clean: torch.Tensor,
        eps: float | None = None,
        **fields,
    ) -> torch.Tensor:
        """``adv`` clipped to the valid pixel range [0, 1] and, with ``eps``, to the L-inf
        ball of radius ``eps`` ([0, 1] units) around ``clean``; padding is reset to
        ``clean``'s values.

        Args:
            adv, clean: pixel values in this space's layout, same shape.
            eps: optional radius in [0, 1] units, > 0.
            **fields: this space's :attr:`image_fields`.

        Returns:
            A new tensor shaped like ``adv``, in its dtype.

        Raises:
            TypeError / ValueError: wrong tensor types, shapes or fields, NaN in ``adv``,
                non-finite ``clean``, ``eps <= 0``.
        """
        adv = check_float_tensor("adv", adv)
        clean = check_float_tensor("clean", clean)
        _check_same_shape("clean", clean, "adv", adv)
        if eps is not None:
            eps = check_positive_float("eps", eps)
        fields = self._fields(fields)
        self._check_layout(adv, fields)
        # max/min propagate NaN: the result would not be in the valid range. An infinite
        # ``adv`` is clipped like any value out of range.
        _check_not_nan("adv", adv)
        _check_finite("clean", clean)
        device = adv.device
        mean, std = self._mean(device), self._std(device)
        lower, upper = -mean / std, (1.0 - mean) / std
        clean_view = self._channel_view(clean).double()
        adv_view = self._channel_view(adv).double()
        if eps is not None:
            lower = torch.maximum(lower, clean_view - eps / std)
            upper = torch.minimum(upper, clean_view + eps / std)
        projected = torch.minimum(torch.maximum(adv_view, lower), upper)
        valid = self._valid_view(adv, fields)
        if valid is not None:
            projected = torch.where(valid, projected, clean_view)
        return projected.to(adv.dtype).reshape(adv.shape)

    def to_pil(self, pixel_values: torch.Tensor, **fields) -> list[Image.Image]:
        """The images of ``pixel_values`` as 8-bit PIL images (RGB, or L for one channel).

        Values are clipped to [0, 1] and rounded to the nearest of the 256 levels, so images
        the processor produced from 8-bit pictures (and k/255 steps of them) convert exactly.
        """
        images = self.to_images(pixel_values, **fields)
        for index, image in enumerate(images):
            if not bool(torch.isfinite(image).all()):
                raise ValueError(
                    f"pixel_values has non-finite values (NaN or +-inf) in image {index}; "
                    "it cannot become a PIL image"
                )
        return [tensor_to_pil(image) for image in images]

    def image_batch_fields(self, inputs: Mapping[str, object]) -> dict:
        """The entries of a model batch that this space's methods take as ``**fields``."""
        return {name: inputs[name] for name in self.image_fields if inputs.get(name) is not None}

    # ---------------------------------------------------------------------------------------
    # Helpers for subclasses
    # ---------------------------------------------------------------------------------------

    def _fields(self, fields: dict) -> dict:
        unknown = sorted(set(fields) - set(self.image_fields))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} takes the fields {list(self.image_fields)}, got "
                f"unexpected {unknown}; use space.image_batch_fields(batch) to pick them"
            )
        return {name: value for name, value in fields.items() if value is not None}

    def _mean(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.mean, dtype=torch.float64, device=device).view(1, -1, 1)

    def _std(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.std, dtype=torch.float64, device=device).view(1, -1, 1)

    def _unit_view(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` in [0, 1] units, float64, as ``[M, C, K]``."""
        device = pixel_values.device
        return self._channel_view(pixel_values).double() * self._std(device) + self._mean(device)

    def _normalized_view(self, units: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_unit_view` on an ``[M, C, K]`` float64 view."""
        device = units.device
        return (units - self._mean(device)) / self._std(device)

    def _check_channels(self, name: str, channels: int) -> None:
        if channels != self.channels:
            raise ValueError(
                f"{name} has {channels} channel(s) but this space was built for "
                f"{self.channels} (from mean/std)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def image_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the [0, 1] images returned for ``pixel_values`` of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """``[C, H, W]`` in [0, 1] (C = 1 or 3) -> 8-bit PIL image, nearest level."""
    try:
        from PIL import Image
    except ImportError as error:  # pillow is only needed for PIL output
        raise ImportError("converting to PIL images needs pillow: pip install pillow") from error
    image = check_float_tensor("image", image)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C = 1 or 3, got {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()):
        # Clamping would turn NaN into black and +-inf into white without a word.
        raise ValueError("image has non-finite values (NaN or +-inf); it cannot become a PIL image")
    levels = (image.detach().double().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = levels.permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]  # uint8 [H, W] makes an "L" image, [H, W, 3] an "RGB" one
    return Image.fromarray(np.ascontiguousarray(array))


def check_images(images: object, channels: int) -> list[torch.Tensor]:
    """A list of ``[C, H, W]`` float tensors with ``channels`` channels."""
    if isinstance(images, torch.Tensor) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of [C, H, W] tensors, got {type(images).__name__}")
    checked = []
    for index, image in enumerate(images):
        image = check_float_tensor(f"images[{index}]", image)
        if image.dim() != 3 or image.shape[0] != channels:
            raise ValueError(
                f"images[{index}] must be [C, H, W] with C = {channels}, got {tuple(image.shape)}"
            )
        checked.append(image)
    return checked


def _per_channel(name: str, value: object, channels: int | None) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = (float(value),) * (channels if channels is not None else 3)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = tuple(float(v) for v in value)
    else:
        raise TypeError(f"{name} must be a float or a sequence of floats, got {value!r}")
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be non-empty and finite, got {values}")
    if channels is not None and len(values) != channels:
        raise ValueError(f"{name} must have {channels} values (one per channel), got {values}")
    return values


def _check_finite(name: str, values: torch.Tensor) -> None:
    """No NaN or +-inf in ``values`` (one host sync on a GPU: a step or a projection costs
    far more)."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(
            f"{name} has non-finite values (NaN or +-inf), e.g. at index "
            f"{bad.nonzero()[0].tolist()}"
        )


def _check_not_nan(name: str, values: torch.Tensor) -> None:
    bad = torch.isnan(values)
    if bool(bad.any()):
        raise ValueError(f"{name} has NaN values, e.g. at index {bad.nonzero()[0].tolist()}")


def _check_same_shape(
    name: str, tensor: torch.Tensor, ref_name: str, reference: torch.Tensor
) -> None:
    if tensor.shape != reference.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(reference.shape)}, got "
            f"{tuple(tensor.shape)}"
        )
    check_same_device(name, tensor, reference, ref_name)
