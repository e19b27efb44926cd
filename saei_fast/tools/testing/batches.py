"""Random images and GRPO-style batches for the tiny VLMs of :mod:`saei_fast.tools.testing.models`
(what :func:`saei_fast.entropy_attack` and the trainers take): random prompts and completions
around the image placeholders, laid out as trainers do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from saei_fast.tools.testing.models import SPECIAL_TOKENS, special_token_ids


def random_images(
    count: int, size: tuple[int, int], *, seed: int = 0, channels: int = 3
) -> list[Image.Image]:
    """``count`` PIL images of ``size = (height, width)`` with uniformly random pixels."""
    rng = np.random.default_rng(seed)
    shape = (size[0], size[1], channels) if channels > 1 else tuple(size)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


@dataclass
class VLMBatch:
    """A model batch and the mask of its completion tokens (what ``entropy_attack`` takes)."""

    inputs: dict[str, torch.Tensor]
    completion_mask: torch.Tensor


def _image_token_count(model, image_inputs: dict, index: int) -> int:
    config = model.config
    if "image_grid_thw" in image_inputs:
        merge = config.vision_config.spatial_merge_size
        return int(image_inputs["image_grid_thw"][index].prod()) // merge**2
    if hasattr(config, "scale_factor"):  # Idefics3: pixel shuffle merges scale_factor**2 patches
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    return int(config.image_seq_length)


def vlm_batch(
    model,
    image_processor,
    images: Sequence[Image.Image | Sequence[Image.Image]],
    *,
    group_size: int = 1,
    prompt_lengths: tuple[int, int] = (3, 6),
    completion_lengths: tuple[int, int] = (4, 9),
    seed: int = 0,
) -> VLMBatch:
    """A GRPO-style batch: ``len(images) * group_size`` rows, ``images[i]`` (one image or a
    list of images) in every row of group ``i``, each row a random prompt around the image
    placeholders and a random completion, laid out as trainers do (prompt left-padded,
    completion right-padded).

    Lengths are drawn uniformly from the inclusive ranges. Every row carries its own copy
    of its image, processed by ``image_processor``; the batch holds the fields the model's
    forward takes (``mm_token_type_ids`` for Qwen-VL).
    """
    ids = special_token_ids(model.config.get_text_config().vocab_size)
    rng = np.random.default_rng(seed)
    groups = [[image] if isinstance(image, Image.Image) else list(image) for image in images]
    row_images = [group for group in groups for _ in range(group_size)]
    if hasattr(image_processor, "do_image_splitting"):  # Idefics3 / SmolVLM: a list per row
        image_inputs = dict(image_processor(row_images, return_tensors="pt"))
    else:
        flat = [image for row in row_images for image in row]
        image_inputs = dict(image_processor(flat, return_tensors="pt"))
    vocab = model.config.get_text_config().vocab_size - len(SPECIAL_TOKENS)  # ordinary token ids

    prompts, completions, image_index = [], [], 0
    for row_group in row_images:
        prompt = rng.integers(0, vocab, rng.integers(1, prompt_lengths[0] + 1)).tolist()
        for _ in row_group:
            placeholder = [ids["image"]] * _image_token_count(model, image_inputs, image_index)
            if "image_grid_thw" in image_inputs:
                placeholder = [ids["vision_start"], *placeholder, ids["vision_end"]]
            prompt += placeholder
            image_index += 1
        length = rng.integers(prompt_lengths[0], prompt_lengths[1] + 1)
        prompts.append(prompt + rng.integers(0, vocab, length).tolist())
        length = rng.integers(completion_lengths[0], completion_lengths[1] + 1)
        completions.append(rng.integers(0, vocab, length).tolist())

    prompt_width = max(map(len, prompts))
    completion_width = max(map(len, completions))
    rows, attention, completion_mask = [], [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        left = prompt_width - len(prompt)
        right = completion_width - len(completion)
        rows.append([ids["pad"]] * left + prompt + completion + [ids["pad"]] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        completion_mask.append([False] * prompt_width + [True] * len(completion) + [False] * right)

    input_ids = torch.tensor(rows, dtype=torch.long)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor(attention, dtype=torch.long),
        **image_inputs,
    }
    if "image_grid_thw" in image_inputs:
        inputs["mm_token_type_ids"] = (input_ids == ids["image"]).int()
    dtype = next(model.parameters()).dtype
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return VLMBatch(inputs=inputs, completion_mask=torch.tensor(completion_mask))
