"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL flattened patches.

The Qwen image processors resize an image to a multiple of ``patch_size * merge_size``,
normalize it, cut it into ``patch_size`` squares, order them merge-window by merge-window
and repeat each still image ``temporal_patch_size`` times (the vision tower's first layer
is a 3D convolution over time). One image of grid ``(t, h, w)`` (in patches) becomes
``t * h * w`` rows of ``pixel_values [num_patches, C * T * P * P]``; the images of a batch are
concatenated in order and ``image_grid_thw [num_images, 3]`` says where each one lies.

Row order inside an image: ``(h / m, w / m, m, m)``; column order: ``(C, T, P, P)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saei_fast.pixels.base import PixelSpace, check_images, image_dtype
from saei_fast.validation import check_float_tensor, check_positive_int, check_tensor


class QwenPatchSpace(PixelSpace):
    """Pixel space of Qwen-VL flattened patches (``pixel_values`` + ``image_grid_thw``).

    Args:
        mean, std: per-channel normalization of the image processor.
        patch_size: side P of a patch in pixels (14 for Qwen2/2.5-VL, 16 for Qwen3-VL).
        temporal_patch_size: number T of time copies of a still image (2).
        merge_size: side m of the window of patches merged into one LLM token (2).
        channels: number of channels (defaults to ``len(mean)``).

    The two temporal copies of a still image always move together: :meth:`step` takes the
    sign of their summed gradient, so the adversarial pixel values are still a real image.
    Only still images (grid ``t = 1``) are images; videos are rejected.
    """

    image_fields = ("image_grid_thw",)

    def __init__(
        self,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        *,
        patch_size: int,
        temporal_patch_size: int,
        merge_size: int,
        channels: int | None = None,
    ) -> None:
        super().__init__(mean, std, channels=channels)
        self.patch_size = check_positive_int("patch_size", patch_size)
        self.temporal_patch_size = check_positive_int("temporal_patch_size", temporal_patch_size)
        self.merge_size = check_positive_int("merge_size", merge_size)

    @property
    def patch_dim(self) -> int:
        """Length ``C * T * P * P`` of one row of ``pixel_values``."""
        return self.channels * self.temporal_patch_size * self.patch_size**2

    # ---------------------------------------------------------------------------------------
    # Layout
    # ---------------------------------------------------------------------------------------

    def _check_layout(self, pixel_values: torch.Tensor, fields: dict) -> None:
        check_float_tensor("pixel_values", pixel_values)
        if pixel_values.dim() != 2 or pixel_values.shape[1] != self.patch_dim:
            raise ValueError(
                f"pixel_values must be [num_patches, C*T*P*P] = [num_patches, {self.patch_dim}] "
                f"(C={self.channels}, T={self.temporal_patch_size}, P={self.patch_size}), got "
                f"{tuple(pixel_values.shape)}"
            )
        grid = fields.get("image_grid_thw")
        if grid is not None:
            grid = self._grid(grid)
            total = int(grid.prod(-1).sum())
            if total != pixel_values.shape[0]:
                raise ValueError(
                    f"image_grid_thw describes {total} patches (sum of t*h*w) but pixel_values "
                    f"has {pixel_values.shape[0]} rows"
                )

    def _grid(self, grid: object) -> torch.Tensor:
        grid = check_tensor("image_grid_thw", grid)
        if grid.dtype.is_floating_point or grid.dtype == torch.bool:
            raise TypeError(f"image_grid_thw must be an integer tensor, got {grid.dtype}")
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be [num_images, 3], got {tuple(grid.shape)}")
        grid = grid.long().cpu()
        if bool((grid <= 0).any()):
            raise ValueError(f"image_grid_thw must be positive, got {grid.tolist()}")
        if bool((grid[:, 1:] % self.merge_size != 0).any()):
            raise ValueError(
                f"image_grid_thw heights and widths must be multiples of merge_size="
                f"{self.merge_size}, got {grid.tolist()}"
            )
        return grid

    def _still_grid(self, fields: dict, method: str) -> torch.Tensor:
        if "image_grid_thw" not in fields:
            raise TypeError(f"{method} needs image_grid_thw=... to find the images")
        grid = self._grid(fields["image_grid_thw"])
        videos = (grid[:, 0] != 1).nonzero().flatten().tolist()
        if videos:
            raise ValueError(
                f"image_grid_thw rows {videos} have t != 1 (videos); only still images "
                f"(t = 1) can be converted to images, got {grid.tolist()}"
            )
        return grid

    def _channel_view(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(values.shape[0], self.channels, -1)

    def _tie_gradient(self, grad_view: torch.Tensor) -> torch.Tensor:
        # The copies of a still image are one image: the gradient w.r.t. the image is the sum
        # of the gradients w.r.t. its copies, and one shared sign keeps them equal.
        by_time = grad_view.reshape(grad_view.shape[0], self.channels, self.temporal_patch_size, -1)
        return by_time.sum(2, keepdim=True).expand_as(by_time).reshape(grad_view.shape)

    def entry_spans(self, pixel_values: torch.Tensor, **fields) -> list[tuple[int, int]]:
        """For each image, the ``[start, stop)`` rows of ``pixel_values`` that hold it."""
        fields = self._fields(fields)
        self._check_layout(pixel_values, fields)
        if "image_grid_thw" not in fields:
            raise TypeError("entry_spans needs image_grid_thw=...")
        sizes = self._grid(fields["image_grid_thw"]).prod(-1).tolist()
        stops = torch.tensor(sizes).cumsum(0).tolist()
        return [(stop - size, stop) for size, stop in zip(sizes, stops, strict=True)]

    def entry_tokens(self, **fields) -> list[int] | None:
        """Placeholder tokens each image takes in ``input_ids``: ``t * h * w / merge_size**2``."""
        fields = self._fields(fields)
        if "image_grid_thw" not in fields:
            raise TypeError("entry_tokens needs image_grid_thw=...")
        grid = self._grid(fields["image_grid_thw"])
        return (grid.prod(-1) // self.merge_size**2).tolist()

    # ---------------------------------------------------------------------------------------
    # Images
    # ---------------------------------------------------------------------------------------

    def to_images(self, pixel_values: torch.Tensor, **fields) -> list[torch.Tensor]:
        """The still images of ``pixel_values`` as ``[C, H, W]`` tensors in [0, 1].

        ``H, W = h * P, w * P`` for each row ``(1, h, w)`` of ``image_grid_thw`` (required).
        The temporal copies of an image are averaged (they are equal for processor output).
        Float32 (float64 for float64 input); exact inverse of :meth:`from_images`.
        """
        fields = self._fields(fields)
        self._check_layout(pixel_values, fields)
        grid = self._still_grid(fields, "to_images")
        m, p = self.merge_size, self.patch_size
        out_dtype = image_dtype(pixel_values.dtype)
        images = []
        for (_, h, w), (start, stop) in zip(
            grid.tolist(), self.entry_spans(pixel_values, **fields), strict=True
        ):
            units = self._unit_view(pixel_values[start:stop])
            patches = units.reshape(h // m, w // m, m, m, self.channels, -1, p, p).mean(5)
            image = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(self.channels, h * p, w * p)
            images.append(image.to(out_dtype))
        return images

    def from_images(self, images: Sequence[torch.Tensor], **fields) -> torch.Tensor:
        """``pixel_values [num_patches, C*T*P*P]`` for ``images`` (each ``[C, H, W]`` in [0, 1])
        laid out by ``image_grid_thw`` (required, one row ``(1, H / P, W / P)`` per image).

        Returns float32 (float64 when the images are float64) on the images' device.
        """
        fields = self._fields(fields)
        images = check_images(images, self.channels)
        grid = self._still_grid(fields, "from_images")
        if len(images) != grid.shape[0]:
            raise ValueError(
                f"got {len(images)} images but image_grid_thw describes {grid.shape[0]}"
            )
        if not images:
            raise ValueError("images must not be empty")
        m, p, t = self.merge_size, self.patch_size, self.temporal_patch_size
        out_dtype = image_dtype(images[0].dtype)
        rows = []
        for index, (image, (_, h, w)) in enumerate(zip(images, grid.tolist(), strict=True)):
            if tuple(image.shape[1:]) != (h * p, w * p):
                raise ValueError(
                    f"images[{index}] is {tuple(image.shape[1:])} (H, W) but image_grid_thw "
                    f"row {index} = (1, {h}, {w}) needs {(h * p, w * p)}"
                )
            units = image.double().reshape(1, self.channels, -1)
            normalized = self._normalized_view(units).reshape(
                self.channels, h // m, m, p, w // m, m, p
            )
            patches = normalized.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
            patches = patches.expand(h // m, w // m, m, m, self.channels, t, p, p)
            rows.append(patches.reshape(h * w, self.patch_dim).to(out_dtype))
        return torch.cat(rows)

    def __repr__(self) -> str:
        return (
            f"QwenPatchSpace(mean={self.mean}, std={self.std}, patch_size={self.patch_size}, "
            f"temporal_patch_size={self.temporal_patch_size}, merge_size={self.merge_size})"
        )
