"""entropy_attack on right-padded batches (every row's prompt and completion at the start,
padding at the end), beside the trainers' left-padded prompts.

The other attack tests build their batches with ``vlm_batch``, which left-pads prompts and
right-pads completions as TRL does; a batch packed by another trainer, or by hand, pads on the
right only. Qwen-VL's positions come from the attention mask, so the same rows padded either
way must give the same objective and the same pixel gradient, and both must match the naive
full-logits objective of the batch as given, also in micro-batches of one row (the row
layout cuts the batch by rows there).
"""

from __future__ import annotations

import pytest
import torch

from saei_fast import AttackConfig, pixels
from saei_fast.attack import pixel_gradient
from saei_fast.reference import naive_attack_objective
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _right_padded(inputs: dict, completion_mask: torch.Tensor, pad_id: int):
    """The same rows with their real tokens moved to the start (padding at the end)."""
    attention = inputs["attention_mask"].bool()
    order = torch.argsort((~attention).int(), dim=1, stable=True)  # real tokens first

    def moved(values, fill):
        out = values.gather(1, order)
        return torch.where(attention.gather(1, order), out, torch.full_like(out, fill))

    right = {**inputs}
    right["input_ids"] = moved(inputs["input_ids"], pad_id)
    right["attention_mask"] = inputs["attention_mask"].gather(1, order)
    right["mm_token_type_ids"] = moved(inputs["mm_token_type_ids"], 0)
    return right, completion_mask.gather(1, order)


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_right_padded_batch_gives_the_left_padded_gradient_and_the_naive_one(micro_batch_size):
    model = tiny_qwen2_5_vl(dtype=torch.float64)
    processor = tiny_qwen_image_processor(max_side=56)
    space = pixels.from_processor(processor)
    images = [random_images(1, size, seed=seed)[0] for seed, size in ((1, (56, 56)), (2, (28, 56)))]
    batch = vlm_batch(model, processor, images, group_size=2, seed=4)
    left, left_mask = batch.inputs, batch.completion_mask
    pad_id = int(left["input_ids"][~left["attention_mask"].bool()][0])
    right, right_mask = _right_padded(left, left_mask, pad_id)
    # The layouts really differ: some row is padded on the left in one, on the right in the other.
    assert not left["attention_mask"][:, 0].all() and right["attention_mask"][:, 0].all()
    assert not torch.equal(left["input_ids"], right["input_ids"])

    config = AttackConfig(group_size=2, micro_batch_size=micro_batch_size)
    ours_left = pixel_gradient(model, left, left_mask, space=space, config=config)
    ours_right = pixel_gradient(model, right, right_mask, space=space, config=config)

    pixel_values = right["pixel_values"].detach().clone().requires_grad_(True)
    objective, band_mask = naive_attack_objective(
        model, {**right, "pixel_values": pixel_values}, right_mask, group_size=2
    )
    (naive,) = torch.autograd.grad(objective, pixel_values)
    scale = float(naive.abs().max())
    assert scale > 0
    assert torch.equal(ours_right.band_mask, band_mask)
    assert ours_right.objective == pytest.approx(float(objective.detach()), rel=1e-12)
    torch.testing.assert_close(ours_right.grad, naive, rtol=0, atol=1e-5 * scale)
    # Same rows, other padding: same objective, same selection size, same gradient.
    assert ours_left.objective == pytest.approx(ours_right.objective, rel=1e-9)
    assert int(ours_left.band_mask.sum()) == int(ours_right.band_mask.sum())
    torch.testing.assert_close(ours_left.grad, ours_right.grad, rtol=0, atol=1e-5 * scale)
