"""SaEIGRPOTrainer on prompts with two images each, of different sizes, through real TRL
generation on a tiny Qwen2.5-VL: with Hugging Face ``generate`` and with the vLLM stand-in.

The other trainer tests have one image per prompt, where slicing the attacked images (or
their patches) per row and per image coincide. Here each prompt holds a 56 x 56 image
(16 patches) and a 28 x 56 one (8 patches), so a slice by rows, by a fixed patch count or
in the wrong order hands some prompt another prompt's image, or its own images swapped.
Every adversarial image is matched, from the pixels the generation backend received, with
the one clean image it is ``alpha`` away from (the clean images are far apart).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trl_helpers import (
    ALPHA,
    GROUP,
    N_ADV,
    N_CLEAN,
    TRAINER_MARKS,
    FakeVLLMServer,
    ModelRecorder,
    make_trainer,
)

import saei_fast
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import colour_examples

pytestmark = TRAINER_MARKS

IMAGES_PER_PROMPT = 2


@pytest.fixture(scope="module")
def two_image_prompts():
    """Two prompts of two images each: a 56 x 56 image, then a 28 x 56 one (all four
    distinct)."""
    images = [example.image for example in colour_examples(4, seed=5)]
    images[1], images[3] = images[1].resize((28, 56)), images[3].resize((28, 56))
    return [images[0:2], images[2:4]]


def _dataset(prompts):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "which colours are in the image?"}]] * 2,
            "images": prompts,
        }
    )


def _clean_images(processor, prompts):
    """Each prompt's clean images as [C, H, W] in [0, 1], from the processor's own pixels."""
    flat = [image for prompt in prompts for image in prompt]
    clean = processor.image_processor(flat, return_tensors="pt")
    space = saei_fast.pixels.from_processor(processor)
    images = space.to_images(clean["pixel_values"], image_grid_thw=clean["image_grid_thw"])
    return [images[i : i + IMAGES_PER_PROMPT] for i in range(0, len(images), IMAGES_PER_PROMPT)]


def _owner(image: torch.Tensor, clean: list[list[torch.Tensor]], alpha: float):
    """``(prompt, image index)`` of the one clean image that ``image`` is within ``alpha``
    of (same size, every pixel within alpha)."""
    owners = [
        (p, k)
        for p, prompt in enumerate(clean)
        for k, candidate in enumerate(prompt)
        if candidate.shape == image.shape and (candidate - image).abs().max() <= alpha
    ]
    assert len(owners) == 1, f"an image matches {len(owners)} clean images"
    return owners[0]


def _assert_adversarial(image: torch.Tensor, clean: torch.Tensor, alpha: float) -> None:
    change = (image - clean).abs()
    assert change.max() <= alpha
    assert (change > alpha / 2).float().mean() > 0.5  # most pixels took the step


def test_hf_generate_gives_each_prompt_its_own_adversarial_images(
    processor, two_image_prompts, tmp_path
):
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    recorder = ModelRecorder(model)
    trainer = make_trainer(model, processor, _dataset(two_image_prompts), tmp_path, max_steps=1)
    trainer.train()

    clean = _clean_images(processor, two_image_prompts)
    space = saei_fast.pixels.from_processor(processor)
    clean_call, adv_call = recorder.generate_calls
    grid = clean_call["image_grid_thw"]
    # 56 x 56 then 28 x 56 for every row: patches 16 and 8.
    assert grid.prod(-1).tolist() == [16, 8] * (2 * N_CLEAN)
    assert torch.equal(adv_call["image_grid_thw"], grid[: 2 * N_ADV * IMAGES_PER_PROMPT])
    for call, rows_per_group, alpha in ((clean_call, N_CLEAN, 0.0), (adv_call, N_ADV, ALPHA)):
        images = space.to_images(call["pixel_values"], image_grid_thw=call["image_grid_thw"])
        owners = [_owner(image, clean, alpha + 1e-5) for image in images]
        prompts = [owner[0] for owner in owners]
        # Rows in groups: each row carries its prompt's two images, in order.
        first = prompts[0]
        expected_prompts = [first] * (rows_per_group * 2) + [1 - first] * (rows_per_group * 2)
        assert prompts == expected_prompts
        assert [owner[1] for owner in owners] == [0, 1] * (2 * rows_per_group)
        if alpha:
            for image, (p, k) in zip(images, owners, strict=True):
                _assert_adversarial(image, clean[p][k], ALPHA + 1e-5)
            # Every row of a group got the same two adversarial images.
            for row in range(2 * N_ADV):
                for k in range(IMAGES_PER_PROMPT):
                    group_first = (row // N_ADV) * N_ADV
                    same = images[group_first * IMAGES_PER_PROMPT + k]
                    assert torch.equal(images[row * IMAGES_PER_PROMPT + k], same)
    # The loss forward: clean images only, every row's two in order.
    (loss_pixels,) = recorder.loss_pixels
    images = space.to_images(loss_pixels, image_grid_thw=grid.repeat(2, 1))
    owners = [_owner(image, clean, 1e-6) for image in images]
    assert sorted(owners) == sorted([(p, k) for p in range(2) for k in range(2)] * GROUP)
    assert [owner[1] for owner in owners] == [0, 1] * (2 * GROUP)


def test_vllm_stand_in_gets_each_prompt_its_own_adversarial_images(
    processor, two_image_prompts, tmp_path
):
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    trainer = make_trainer(
        model, processor, _dataset(two_image_prompts), tmp_path, full_length=False
    )
    fake = FakeVLLMServer(model, processor, max_tokens=4)
    # The state TRL's __init__ sets for use_vllm=True, vllm_mode="server" (which needs vLLM).
    trainer.use_vllm, trainer.vllm_mode, trainer.vllm_generation = True, "server", fake
    trainer._last_loaded_step = trainer.state.global_step
    trainer.model.train()
    inputs = [dict(trainer.train_dataset[i]) for i in (0, 1) for _ in range(GROUP)]
    output = trainer._generate_and_score_completions(inputs)
    assert output["completion_ids"].shape[0] == 2 * GROUP

    clean_call, adv_call = fake.calls
    assert clean_call["n"] == N_CLEAN and adv_call["n"] == N_ADV
    for call, n in ((clean_call, N_CLEAN), (adv_call, N_ADV)):
        assert len(call["images"]) == 2 * n
        for row, images in enumerate(call["images"]):
            assert len(images) == IMAGES_PER_PROMPT
            for k, image in enumerate(images):
                sent = np.asarray(image, dtype=np.int16)
                want = np.asarray(two_image_prompts[row // n][k], dtype=np.int16)
                assert sent.shape == want.shape
                if call is clean_call:
                    assert np.array_equal(sent, want)
                else:
                    # 8-bit: alpha = 8/255 is 8 levels; within one level of rounding.
                    assert 0 < np.abs(sent - want).max() <= 8 + 1
                    others = [
                        np.asarray(other, dtype=np.int16)
                        for p, prompt in enumerate(two_image_prompts)
                        for j, other in enumerate(prompt)
                        if (p, j) != (row // n, k)
                    ]
                    assert all(o.shape != sent.shape or np.abs(sent - o).max() > 9 for o in others)
