"""Per-row views of a processor's batched multimodal fields, and model batches built from them.

A Hugging Face processor packs the images of a whole batch into shared tensors
(``pixel_values`` as the concatenated patches of every image for Qwen-VL, one entry per image
for plain image models, ``image_grid_thw`` one row per image) next to per-row token fields
(``mm_token_type_ids``). SaEI generates from subsets of rows and swaps the image of some of
them, so these fields must be cut into rows and glued back in any order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RowImage:
    """The image(s) of one batch row: PIL images (for backends that take images) and the
    row's share of every multimodal field the processor produced (tensors for per-image
    fields, a list for per-token fields)."""

    pil: list
    fields: dict = field(default_factory=dict)


def split_rows(multimodal_fields: dict, images: Sequence[Sequence], num_rows: int) -> list[dict]:
    """Cut batched multimodal fields into ``num_rows`` per-row dicts.

    Args:
        multimodal_fields: what the processor returned besides ``input_ids`` and
            ``attention_mask`` (tensors, numpy arrays or per-row lists).
        images: the PIL images of every row (a list per row), in processor order.
        num_rows: rows in the batch.

    Raises:
        ValueError: a field that is neither per image, per Qwen-VL patch nor per row.
    """
    counts = [len(row) for row in images]
    if len(counts) != num_rows:
        raise ValueError(f"images must hold one list per row ({num_rows}), got {len(counts)}")
    num_images = sum(counts)
    grid = multimodal_fields.get("image_grid_thw")
    patches = None if grid is None else torch.as_tensor(np.asarray(grid)).prod(-1).tolist()
    rows = [{} for _ in range(num_rows)]
    for key, value in multimodal_fields.items():
        if isinstance(value, list) and (not value or isinstance(value[0], (list, tuple))):
            if len(value) != num_rows:
                raise ValueError(
                    f"multimodal field {key!r} is a list of {len(value)} items for {num_rows} rows"
                )
            for row, item in zip(rows, value, strict=True):
                row[key] = list(item)
            continue
        tensor = torch.as_tensor(np.asarray(value)) if not torch.is_tensor(value) else value
        if key == "pixel_values" and patches is not None:
            pieces = _group(list(tensor.split(patches)), counts)
        elif tensor.dim() > 0 and tensor.shape[0] == num_images:
            pieces = _group(list(tensor.split(1)), counts)
        elif tensor.dim() > 0 and tensor.shape[0] == num_rows:
            pieces = list(tensor.split(1))
        else:
            raise ValueError(
                f"multimodal field {key!r} of shape {tuple(tensor.shape)} is neither per image "
                f"({num_images}), per image patch (image_grid_thw) nor per row ({num_rows}); "
                "SaEI cannot tell which row owns which part of it"
            )
        for row, piece in zip(rows, pieces, strict=True):
            row[key] = piece
    return rows


def merge_rows(rows: Sequence[dict]) -> dict:
    """Inverse of :func:`split_rows` for any selection of rows, in the given order."""
    merged = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        merged[key] = torch.cat(values) if torch.is_tensor(values[0]) else values
    return merged


def model_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    row_fields: Sequence[dict],
    *,
    pad_token_id: int,
    device: torch.device,
) -> tuple[dict, torch.Tensor]:
    """A model batch of prompt + completion rows, laid out as GRPO trainers do (prompts
    left-padded, completions right-padded), and its bool completion mask ``[B, L]``.

    Per-token fields (lists, such as ``mm_token_type_ids``) are padded like the prompt and
    extended with zeros over the completion; per-image tensors are concatenated.
    """
    prompt_width = max(len(ids) for ids in prompt_ids)
    completion_width = max(len(ids) for ids in completion_ids)
    rows, attention, completion = [], [], []
    for prompt, answer in zip(prompt_ids, completion_ids, strict=True):
        left = prompt_width - len(prompt)
        right = completion_width - len(answer)
        rows.append([pad_token_id] * left + list(prompt) + list(answer) + [pad_token_id] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(answer)) + [0] * right)
        completion.append([False] * prompt_width + [True] * len(answer) + [False] * right)
    batch = {
        "input_ids": torch.tensor(rows, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(attention, dtype=torch.long, device=device),
    }
    for key, value in merge_rows(row_fields).items():
        if torch.is_tensor(value):
            batch[key] = value.to(device)
            continue
        padded = [
            [0] * (prompt_width - len(tokens)) + list(tokens) + [0] * completion_width
            for tokens in value
        ]
        batch[key] = torch.tensor(padded, dtype=torch.long, device=device)
    return batch, torch.tensor(completion, dtype=torch.bool, device=device)


def _group(pieces: list, counts: list[int]) -> list:
    """Concatenate consecutive ``pieces``: ``counts[i]`` of them for row i."""
    out, start = [], 0
    for count in counts:
        chunk = pieces[start : start + count]
        out.append(torch.cat(chunk) if chunk else pieces[0][:0])
        start += count
    return out


def adversarial_images(
    rows: Sequence[RowImage], pixel_values: torch.Tensor, pil: Sequence, group_size: int
) -> list[RowImage]:
    """One :class:`RowImage` per group of ``group_size`` rows from the attack's output:
    ``pixel_values`` (the batched field, laid out as the rows' own) and ``pil`` (one
    image per image of the batch, in row order).

    A row may carry several images, so both are cut at image offsets, not row indices;
    each group's first row gives the group's images (every row of a group carries them).

    Raises:
        ValueError: ``pil`` does not hold one image per image of the rows, or a row's
            adversarial field holds another number of images than its clean one (an
            image would be paired with the wrong prompt).
    """
    counts = [len(row.pil) for row in rows]
    if len(pil) != sum(counts):
        raise ValueError(
            f"the attack returned {len(pil)} adversarial images for {len(rows)} rows holding "
            f"{sum(counts)} images ({counts} per row); each prompt needs its own"
        )
    fields = split_rows(
        {**merge_rows([row.fields for row in rows]), "pixel_values": pixel_values},
        [row.pil for row in rows],
        len(rows),
    )
    starts = np.cumsum([0, *counts]).tolist()
    out = []
    for first in range(0, len(rows), group_size):
        clean = rows[first].fields.get("pixel_values")
        adversarial = fields[first]["pixel_values"]
        if clean is not None and adversarial.shape != clean.shape:
            raise ValueError(
                f"row {first}: the adversarial pixel_values {tuple(adversarial.shape)} do not "
                f"have the clean ones' shape {tuple(clean.shape)}"
            )
        out.append(
            RowImage(
                pil=list(pil[starts[first] : starts[first + 1]]),
                fields={**rows[first].fields, "pixel_values": adversarial.detach()},
            )
        )
    return out
