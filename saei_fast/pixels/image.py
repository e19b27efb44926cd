"""Plain image tensors: ``[B, C, H, W]`` (LLaVA, Gemma3, ...) and ``[B, N, C, H, W]`` with an
optional ``pixel_attention_mask [B, N, H, W]`` (Idefics3 / SmolVLM).

Idefics3-style processors pad every image of a batch to the largest height and width (bottom
and right, with 0 in normalized space) and pad rows with fewer images with all-zero slots;
``pixel_attention_mask`` is True on real pixels. Padding is never moved by :meth:`step`, is
reset to the clean values by :meth:`project`, and is left out of :meth:`to_images`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saei_fast.pixels.base import PixelSpace, check_images, image_dtype
from saei_fast.validation import check_float_tensor, check_positive_int, check_tensor


class ImageSpace(PixelSpace):
    """Pixel space of normalized image tensors ``[..., C, H, W]`` (4 or 5 dims).

    Args:
        mean, std: per-channel normalization of the image processor.
        channels: number of channels (defaults to ``len(mean)``).

    Fields: ``pixel_attention_mask`` (optional, bool or 0/1, ``pixel_values.shape[:-3] + (H,
    W)``); the real pixels of each image must form a top-left rectangle, as processors pad.
    """

    image_fields = ("pixel_attention_mask",)

    # ---------------------------------------------------------------------------------------
    # Layout
    # ---------------------------------------------------------------------------------------

    def _check_layout(self, pixel_values: torch.Tensor, fields: dict) -> None:
        check_float_tensor("pixel_values", pixel_values)
        if pixel_values.dim() not in (4, 5):
            raise ValueError(
                f"pixel_values must be [B, C, H, W] or [B, N, C, H, W], got "
                f"{tuple(pixel_values.shape)}"
            )
        self._check_channels("pixel_values", pixel_values.shape[-3])
        mask = fields.get("pixel_attention_mask")
        if mask is not None:
            mask = check_tensor("pixel_attention_mask", mask)
            expected = (*pixel_values.shape[:-3], *pixel_values.shape[-2:])
            if tuple(mask.shape) != expected:
                raise ValueError(
                    f"pixel_attention_mask must have shape {expected} (pixel_values without "
                    f"its channel dim), got {tuple(mask.shape)}"
                )
            if mask.dtype.is_floating_point:
                raise TypeError(
                    f"pixel_attention_mask must be a bool or integer tensor, got {mask.dtype}"
                )

    def _channel_view(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(-1, self.channels, values.shape[-2] * values.shape[-1])

    def _valid_view(self, pixel_values: torch.Tensor, fields: dict) -> torch.Tensor | None:
        mask = fields.get("pixel_attention_mask")
        if mask is None:
            return None
        return mask.reshape(-1, 1, mask.shape[-2] * mask.shape[-1]).bool()

    def entry_spans(self, pixel_values: torch.Tensor, **fields) -> list[tuple[int, int]]:
        """For each entry of dim 0 (an image, or a row's images for 5 dims), its span."""
        fields = self._fields(fields)
        self._check_layout(pixel_values, fields)
        return [(index, index + 1) for index in range(pixel_values.shape[0])]

    def entry_tokens(self, **fields) -> list[int] | None:
        """Placeholder tokens per entry are model-specific here: None (every entry alike)."""
        self._fields(fields)
        return None

    # ---------------------------------------------------------------------------------------
    # Images
    # ---------------------------------------------------------------------------------------

    def to_images(self, pixel_values: torch.Tensor, **fields) -> list[torch.Tensor]:
        """Every image of ``pixel_values`` as ``[C, H, W]`` in [0, 1], leading dims flattened
        in order. With ``pixel_attention_mask``, all-padding slots are skipped and each image
        is cropped to its real pixels. Float32 (float64 for float64 input)."""
        fields = self._fields(fields)
        self._check_layout(pixel_values, fields)
        height, width = pixel_values.shape[-2:]
        units = self._unit_view(pixel_values).reshape(-1, self.channels, height, width)
        units = units.to(image_dtype(pixel_values.dtype))
        mask = fields.get("pixel_attention_mask")
        if mask is None:
            return list(units.unbind(0))
        images = []
        for index, valid in enumerate(mask.reshape(-1, height, width).bool()):
            box = _valid_box(valid, index)
            if box is not None:
                images.append(units[index, :, : box[0], : box[1]])
        return images

    def from_images(
        self,
        images: Sequence[torch.Tensor],
        *,
        images_per_sample: int | None = None,
        **fields,
    ) -> torch.Tensor:
        """Normalized ``pixel_values`` for ``images`` (each ``[C, H, W]`` in [0, 1]).

        - With ``pixel_attention_mask`` (shape ``[B, N, H, W]`` or ``[B, H, W]``): the layout
          of the mask; the images fill its non-empty slots in order, top-left, and padding is
          0 (what the processors pad with).
        - Without it: ``[B, C, H, W]``, or ``[B, N, C, H, W]`` with ``images_per_sample=N``;
          the images must then all have one size.

        Returns float32 (float64 when the images are float64) on the images' device.
        """
        fields = self._fields(fields)
        images = check_images(images, self.channels)
        if not images:
            raise ValueError("images must not be empty")
        out_dtype = image_dtype(images[0].dtype)
        device = images[0].device
        mask = fields.get("pixel_attention_mask")
        if mask is None:
            return self._stack(images, images_per_sample, out_dtype)
        mask = check_tensor("pixel_attention_mask", mask)
        if mask.dim() not in (3, 4):
            raise ValueError(
                f"pixel_attention_mask must be [B, H, W] or [B, N, H, W], got {tuple(mask.shape)}"
            )
        height, width = mask.shape[-2:]
        slots = mask.reshape(-1, height, width).bool()
        boxes = [_valid_box(valid, index) for index, valid in enumerate(slots)]
        filled = [index for index, box in enumerate(boxes) if box is not None]
        if len(filled) != len(images):
            raise ValueError(
                f"pixel_attention_mask has {len(filled)} non-empty image slots but got "
                f"{len(images)} images"
            )
        out = torch.zeros(
            len(slots), self.channels, height, width, dtype=torch.float64, device=device
        )
        for image_index, slot in enumerate(filled):
            image, (h, w) = images[image_index], boxes[slot]
            if tuple(image.shape[1:]) != (h, w):
                raise ValueError(
                    f"images[{image_index}] is {tuple(image.shape[1:])} (H, W) but its slot in "
                    f"pixel_attention_mask has {(h, w)} real pixels"
                )
            units = image.double().reshape(1, self.channels, -1)
            out[slot, :, :h, :w] = self._normalized_view(units).reshape(self.channels, h, w)
        return out.reshape(*mask.shape[:-2], self.channels, height, width).to(out_dtype)

    def _stack(
        self, images: list[torch.Tensor], images_per_sample: int | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        sizes = {tuple(image.shape) for image in images}
        if len(sizes) != 1:
            raise ValueError(
                f"images of different sizes {sorted(sizes)} need pixel_attention_mask=... to "
                "say where each one goes"
            )
        units = torch.stack([image.double() for image in images])
        normalized = self._normalized_view(units.reshape(len(images), self.channels, -1))
        stacked = normalized.reshape(units.shape).to(out_dtype)
        if images_per_sample is None:
            return stacked
        images_per_sample = check_positive_int("images_per_sample", images_per_sample)
        if len(images) % images_per_sample:
            raise ValueError(
                f"{len(images)} images do not split into samples of images_per_sample="
                f"{images_per_sample}"
            )
        return stacked.reshape(-1, images_per_sample, *stacked.shape[1:])


def _valid_box(valid: torch.Tensor, index: int) -> tuple[int, int] | None:
    """``(h, w)`` of the top-left rectangle of real pixels in one ``[H, W]`` slot, None when
    the slot is all padding."""
    count = int(valid.sum())
    if count == 0:
        return None
    h = int(valid.any(1).sum())
    w = int(valid.any(0).sum())
    if count != h * w or not bool(valid[:h, :w].all()):
        raise ValueError(
            f"pixel_attention_mask image {index}: the real pixels must form a top-left "
            f"rectangle (padding at the bottom and right, as processors pad)"
        )
    return h, w
