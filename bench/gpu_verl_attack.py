"""On a GPU with flash-attn: the actor attack in verl's packed layout through the real kernel.

The CPU tests run verl's patched Qwen2/2.5-VL attention with packed rows
(``use_remove_padding=True``) on a float64 stand-in for flash-attn's varlen kernel. Here the
real ``flash_attn_varlen_func`` runs instead. verl's attention casts float32 queries, keys
and values to bfloat16 for flash-attn, so the packed gradient is compared with the padded
layout (``use_remove_padding=False``, transformers' sdpa attention in float32) by direction,
not bit for bit:

- cosine similarity of the pixel gradients >= 0.99,
- adversarial pixels equal for >= 95% of the values (signs of near-zero gradients may flip).

    python bench/gpu_verl_attack.py        (exit status 0 when both hold)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "verl"))

from _verl_models import verl_patched, verl_position_ids
from verl import DataProto

from saei_fast import pixels
from saei_fast.attack import AttackConfig
from saei_fast.integrations.verl.worker import saei_attack_on
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

ROWS = 4


def _attack(model, space, group, *, remove_padding, mode):
    column = np.empty(1, dtype=object)
    column[:] = [group]
    data = DataProto.from_dict(
        non_tensors={"saei_group": column},
        meta_info={"saei_space": space, "saei_config": AttackConfig(), "saei_mode": mode},
    )
    return saei_attack_on(model, data, remove_padding=remove_padding).non_tensor_batch[
        "saei_result"
    ][0]


def main() -> int:
    model = tiny_qwen2_5_vl(hidden_size=256, num_layers=4, vocab_size=4096, seed=0)
    processor = tiny_qwen_image_processor(max_side=112)
    batch = vlm_batch(
        model, processor, random_images(1, (112, 112), seed=1), group_size=ROWS, seed=1,
        completion_lengths=(40, 120),
    )  # fmt: skip
    inputs = {key: value for key, value in batch.inputs.items() if key != "mm_token_type_ids"}
    inputs["position_ids"] = verl_position_ids(model, batch.inputs)
    group = {
        **inputs,
        "completion_mask": batch.completion_mask,
        "image_rows": inputs["pixel_values"].shape[0] // ROWS,
    }
    space = pixels.from_processor(processor)
    model = model.cuda()
    results = {}
    for remove_padding in (False, True):
        with verl_patched(model, use_remove_padding=remove_padding):
            results[remove_padding] = (
                _attack(model, space, group, remove_padding=remove_padding, mode="gradient"),
                _attack(model, space, group, remove_padding=remove_padding, mode="attack"),
            )
    (grad_padded, adv_padded), (grad_packed, adv_packed) = results[False], results[True]
    a, b = grad_padded["grad"].flatten().double(), grad_packed["grad"].flatten().double()
    cosine = float(a @ b / (a.norm() * b.norm()))
    same = float((adv_padded["pixel_values"] == adv_packed["pixel_values"]).double().mean())
    print(f"packed vs padded: gradient cosine {cosine:.5f}, equal adversarial values {same:.4f}")
    return 0 if cosine >= 0.99 and same >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
