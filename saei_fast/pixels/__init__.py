"""Pixel spaces: a model's ``pixel_values`` <-> images in [0, 1], signed steps, projection, PIL.

Every space has the same methods (the fields that locate the images, e.g.
``image_grid_thw`` or ``pixel_attention_mask``, are passed by keyword)::

    space.to_images(pixel_values, **fields) -> list[Tensor]      # each [C, H, W] in [0, 1]
    space.from_images(images, **fields) -> Tensor                # inverse, same layout
    space.step(pixel_values, grad, alpha, **fields) -> Tensor    # signed step, [0, 1] units
    space.project(adv, clean, eps=None, **fields) -> Tensor      # eps-ball + valid range
    space.to_pil(pixel_values, **fields) -> list[PIL.Image.Image]

``space.image_batch_fields(batch)`` picks those fields out of a model batch.
``to_images`` and ``from_images`` are differentiable (plain tensor arithmetic), so a loss on
images can be carried back to ``pixel_values`` and vice versa.

Build one with :func:`from_processor` (reads the constants from a Hugging Face processor) or
explicitly: :class:`QwenPatchSpace` for Qwen2/2.5/3-VL flattened patches, :class:`ImageSpace`
for ``[B, C, H, W]`` / ``[B, N, C, H, W]`` image tensors.
"""

from __future__ import annotations

import math

from saei_fast.pixels.base import UINT8_SCALE, PixelSpace, tensor_to_pil
from saei_fast.pixels.image import ImageSpace
from saei_fast.pixels.qwen import QwenPatchSpace

# Attributes that only the Qwen-VL family of image processors (flattened patches) carries.
_PATCH_ATTRIBUTES = ("patch_size", "temporal_patch_size", "merge_size")


def from_processor(processor: object) -> PixelSpace:
    """The pixel space of a Hugging Face processor (or of its ``image_processor``).

    Mean, std and patch sizes are read from the image processor: processors with
    ``patch_size``, ``temporal_patch_size`` and ``merge_size`` (Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL) give a :class:`QwenPatchSpace`, all others an :class:`ImageSpace`
    (``[B, C, H, W]`` / ``[B, N, C, H, W]`` tensors). A processor with ``do_normalize=False``
    gives mean 0 and std 1.

    Raises:
        TypeError: the object has no ``image_mean`` / ``image_std`` (not an image processor).
        ValueError: the processor does not map 8-bit pixels to [0, 1] (``do_rescale`` with
            ``rescale_factor = 1/255``), which [0, 1] steps and PIL conversion rely on.
    """
    image_processor = getattr(processor, "image_processor", None) or processor
    name = type(image_processor).__name__
    if not hasattr(image_processor, "image_mean") or not hasattr(image_processor, "image_std"):
        raise TypeError(
            f"processor must be a Hugging Face processor or image processor with image_mean and "
            f"image_std, got {name}; build a space explicitly (QwenPatchSpace / ImageSpace)"
        )
    do_rescale = getattr(image_processor, "do_rescale", True)
    rescale_factor = getattr(image_processor, "rescale_factor", UINT8_SCALE)
    if not do_rescale or not math.isclose(rescale_factor, UINT8_SCALE, rel_tol=1e-6):
        raise ValueError(
            f"processor ({name}) must rescale 8-bit pixels to [0, 1] (do_rescale=True, "
            f"rescale_factor=1/255), got do_rescale={do_rescale}, rescale_factor={rescale_factor}"
        )
    mean, std = image_processor.image_mean, image_processor.image_std
    if not getattr(image_processor, "do_normalize", True) or mean is None or std is None:
        mean, std = 0.0, 1.0
    if all(getattr(image_processor, attr, None) is not None for attr in _PATCH_ATTRIBUTES):
        return QwenPatchSpace(
            mean,
            std,
            patch_size=image_processor.patch_size,
            temporal_patch_size=image_processor.temporal_patch_size,
            merge_size=image_processor.merge_size,
        )
    return ImageSpace(mean, std)


__all__ = [
    "ImageSpace",
    "PixelSpace",
    "QwenPatchSpace",
    "from_processor",
    "tensor_to_pil",
]
