"""Tiny random-weight VLMs, their image processors and batches, built in code (no downloads).

The test suites use them, and they are a quick way to try the library without a GPU:

    model = tiny_qwen2_5_vl()
    processor = tiny_qwen_image_processor()
    batch = vlm_batch(model, processor, random_images(2, (56, 56)), group_size=3)
    result = saei_fast.entropy_attack(model, batch.inputs, batch.completion_mask,
        space=saei_fast.pixels.from_processor(processor),
        config=saei_fast.AttackConfig(group_size=3))

Special tokens take the top ids of the vocabulary; prompts and completions are random ids
below them. Requires ``transformers`` (>= 5.0, for the configs and PIL image processors) and
``pillow``; importing ``saei_fast`` alone does not import this package.

Files: ``models.py`` (the tiny models, their image processors, the special token ids) and
``batches.py`` (random images, :func:`vlm_batch`).
"""

from saei_fast.tools.testing.batches import VLMBatch, random_images, vlm_batch
from saei_fast.tools.testing.models import (
    special_token_ids,
    tiny_idefics3,
    tiny_idefics3_image_processor,
    tiny_llava,
    tiny_llava_image_processor,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
    tiny_qwen_image_processor,
)

__all__ = [
    "VLMBatch",
    "random_images",
    "special_token_ids",
    "tiny_idefics3",
    "tiny_idefics3_image_processor",
    "tiny_llava",
    "tiny_llava_image_processor",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_qwen3_vl",
    "tiny_qwen_image_processor",
    "vlm_batch",
]
