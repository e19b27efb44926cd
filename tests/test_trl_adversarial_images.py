"""The attack's adversarial images handed back to each prompt: cut at image offsets (a
prompt may carry several images), and counted, so that an image is never paired with
another prompt (``saei_fast.integrations.shared.rows.adversarial_images``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image
from trl_attack_worker import attack_arguments, build_trainer

import saei_fast.integrations.trl.sampling as integration
from saei_fast.integrations.shared.rows import RowImage, adversarial_images, merge_rows, split_rows
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.testing import random_images

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def rows_with_images(processor, counts: list[int]) -> list[RowImage]:
    """Rows carrying ``counts[r]`` distinct images each, with the processor's fields."""
    images = random_images(sum(counts), (56, 56), seed=4)
    per_row, start = [], 0
    for count in counts:
        per_row.append(images[start : start + count])
        start += count
    fields = dict(processor.image_processor(images, return_tensors="pt"))
    split = split_rows(fields, per_row, len(counts))
    return [RowImage(pil=pil, fields=f) for pil, f in zip(per_row, split, strict=True)]


def test_groups_get_their_own_images_when_prompts_carry_several(processor):
    # Two groups of 2 rows: the first prompt has 2 images, the second 1.
    rows = rows_with_images(processor, [2, 2, 1, 1])
    rows[1], rows[3] = rows[0], rows[2]  # rows of a group carry the same images
    clean = merge_rows([row.fields for row in rows])["pixel_values"]
    attacked = clean + torch.arange(len(clean), dtype=clean.dtype)[:, None]  # tells rows apart
    pil = [Image.new("RGB", (56, 56), (i, 0, 0)) for i in range(6)]

    first, second = adversarial_images(rows, attacked, pil, group_size=2)

    assert first.pil == pil[0:2] and second.pil == pil[4:5]
    patches = [len(row.fields["pixel_values"]) for row in rows]
    assert torch.equal(first.fields["pixel_values"], attacked[: patches[0]])
    start = sum(patches[:2])
    assert torch.equal(second.fields["pixel_values"], attacked[start : start + patches[2]])
    assert torch.equal(second.fields["image_grid_thw"], rows[2].fields["image_grid_thw"])


def test_a_wrong_number_of_adversarial_images_is_an_error(processor):
    rows = rows_with_images(processor, [2, 2])
    rows[1] = rows[0]
    pixel_values = merge_rows([row.fields for row in rows])["pixel_values"]
    pil = [Image.new("RGB", (56, 56)) for _ in range(3)]
    with pytest.raises(ValueError, match=r"returned 3 adversarial images for 2 rows holding 4"):
        adversarial_images(rows, pixel_values, pil, group_size=2)


def test_the_trainer_checks_the_attacks_image_count(processor, examples, tmp_path, monkeypatch):
    model = demo_model(processor, hidden_size=32, seed=0)
    trainer = build_trainer(model, processor, examples, tmp_path)
    original = integration.entropy_attack

    def one_image_short(*args, **kwargs):
        result = original(*args, **kwargs)
        return dataclasses.replace(result, images=result.images[:-1])

    monkeypatch.setattr(integration, "entropy_attack", one_image_short)
    with pytest.raises(ValueError, match="returned 3 adversarial images for 4 rows holding 4"):
        trainer._saei_attack(*attack_arguments(model, processor, examples, 3))
