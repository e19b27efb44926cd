"""The entropy attack on a tiny Qwen2.5-VL built from a config (random weights, no download):
the adversarial image that raises the middle-band entropy of the sampled responses.

    python examples/attack_tiny_vlm.py [OUT_DIR]

With a real model, build `inputs` from your processor (prompt + sampled completion per row,
each row with its image) and pass `completion_mask`; the rest is the same.
"""

import sys
from pathlib import Path

import torch

import saei_fast
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

torch.manual_seed(0)
model = tiny_qwen2_5_vl()
processor = tiny_qwen_image_processor()
space = saei_fast.pixels.from_processor(processor)  # mean, std and patch size read from it

# 2 prompts (images) x 3 sampled responses each: rows of a group share their image.
batch = vlm_batch(model, processor, random_images(2, (56, 56)), group_size=3)
config = saei_fast.AttackConfig(alpha=2 / 255, group_size=3, measure_after=True)
result = saei_fast.entropy_attack(
    model, batch.inputs, batch.completion_mask, space=space, config=config
)

print(f"band objective: {result.entropy_before:.4f} -> {result.entropy_after:.4f} nats")
print(f"selected tokens: {result.num_selected}, images: {len(result.images)}")
clean = space.to_images(batch.inputs["pixel_values"], image_grid_thw=batch.inputs["image_grid_thw"])
adv = space.to_images(result.pixel_values, image_grid_thw=batch.inputs["image_grid_thw"])
change = max(float((a - c).abs().max()) for a, c in zip(adv, clean, strict=True))
print(f"largest pixel change: {change:.5f}")

out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(result.images):
        image.save(out / f"adversarial_{index}.png")
