"""Which rows of a VLM batch own which images, so a batch can be cut into groups and
micro-batches.

A Hugging Face processor packs the images of a batch into shared tensors (``pixel_values``
as the concatenated patches of every image for Qwen-VL, one entry per image or per row for
plain image models) next to per-row token fields. The attack runs on subsets of rows and
ties the gradients of rows that share an image, so it needs, for every batch row, its span
of ``pixel_values`` and of every other field: :class:`RowLayout` computes that once, before
any forward pass.
"""

from __future__ import annotations

import torch

from saei_fast.pixels.base import PixelSpace


class RowLayout:
    """Maps batch rows to their images, so rows can be cut into micro-batches and groups.

    ``pixel_values`` holds "entries" along dim 0 (a Qwen image's patches, one image tensor,
    or one row's images for ``[B, N, C, H, W]``). Rows own contiguous entries: one each when
    there are as many entries as rows; otherwise they are counted from each row's image
    placeholder tokens (``model.config.image_token_id``), per entry from the space (Qwen:
    ``t*h*w / merge**2``) or split evenly (plain tensors).
    """

    def __init__(self, model, inputs: dict, space: PixelSpace, fields: dict) -> None:
        input_ids = inputs["input_ids"]
        self.batch_size = input_ids.shape[0]
        pixel_values = inputs["pixel_values"]
        spans = space.entry_spans(pixel_values, **fields)
        self.entries = self._entries_per_row(model, input_ids, space, fields, len(spans))
        self.spans = spans
        self.plan = slice_plan(inputs, space, self.batch_size, len(spans))

    def _entries_per_row(self, model, input_ids, space, fields, count) -> list[tuple[int, int]]:
        tokens = space.entry_tokens(**fields)
        if tokens is None and count == self.batch_size:
            return [(row, row + 1) for row in range(self.batch_size)]
        token_id = image_token_id(model)
        if token_id is None:
            raise ValueError(
                f"pixel_values holds {count} images for {self.batch_size} rows and the model "
                "config has no image_token_id to tell which row owns which image"
            )
        per_row = (input_ids == token_id).sum(1).tolist()
        if tokens is None:
            total = sum(per_row)
            if total % count:
                raise ValueError(
                    f"{total} image tokens do not split evenly over the {count} images of "
                    "pixel_values"
                )
            tokens = [total // count] * count
        bounds, entry = [], 0
        for row, needed in enumerate(per_row):
            first = entry
            while needed > 0 and entry < count:
                needed -= tokens[entry]
                entry += 1
            if needed != 0 or entry == first:
                raise ValueError(
                    f"row {row} of input_ids has {per_row[row]} image tokens, which do not match "
                    f"its images in pixel_values; every row must carry its own image(s)"
                )
            bounds.append((first, entry))
        if entry != count:
            raise ValueError(
                f"input_ids has image tokens for {entry} images but pixel_values holds {count}"
            )
        return bounds

    def pixel_span(self, start: int, stop: int) -> tuple[int, int]:
        """Rows of ``pixel_values`` (dim 0) that batch rows ``[start, stop)`` own."""
        return self.spans[self.entries[start][0]][0], self.spans[self.entries[stop - 1][1] - 1][1]

    def rows(self, inputs: dict, start: int, stop: int) -> dict:
        """The batch restricted to rows ``[start, stop)``."""
        first, last = self.entries[start][0], self.entries[stop - 1][1]
        pixel_start, pixel_stop = self.pixel_span(start, stop)
        out = {}
        for key, value in inputs.items():
            how = self.plan[key]
            if how == "pixels":
                out[key] = value[pixel_start:pixel_stop]
            elif how == "entries":
                out[key] = value[first:last]
            elif how == "rows":
                out[key] = value[start:stop]
            elif how == "rows_dim1":
                out[key] = value[:, start:stop]
            else:
                out[key] = value
        return out

    def check_groups(self, pixel_values: torch.Tensor, group_size: int) -> None:
        for first in range(0, self.batch_size, group_size):
            start, stop = self.pixel_span(first, first + 1)
            image = pixel_values[start:stop]
            for row in range(first + 1, first + group_size):
                other_start, other_stop = self.pixel_span(row, row + 1)
                other = pixel_values[other_start:other_stop]
                if other.shape != image.shape or not torch.equal(other, image):
                    raise ValueError(
                        f"rows {first} and {row} are in one group (group_size={group_size}) "
                        "but carry different images; rows sharing an image must be contiguous"
                    )


def slice_plan(inputs: dict, space: PixelSpace, batch_size: int, entries: int) -> dict[str, str]:
    """How each field of the batch is cut by rows (checked once, before any work)."""
    plan = {}
    for key, value in inputs.items():
        if key == "pixel_values":
            plan[key] = "pixels"
        elif key in space.image_fields:
            plan[key] = "entries"
        elif not isinstance(value, torch.Tensor) or value.dim() == 0:
            plan[key] = "keep"
        elif key == "position_ids" and value.dim() == 3 and value.shape[1] == batch_size:
            plan[key] = "rows_dim1"  # multimodal RoPE positions [k, B, L]
        elif value.shape[0] == batch_size:
            plan[key] = "rows"
        elif value.shape[0] == entries:
            plan[key] = "entries"
        else:
            raise ValueError(
                f"inputs[{key!r}] has shape {tuple(value.shape)}: neither batch rows "
                f"({batch_size}) nor images ({entries}) along dim 0, so it cannot be split "
                "into micro-batches or groups"
            )
    return plan


def image_token_id(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
