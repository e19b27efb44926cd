"""The worker method's body against saei_fast's attack, and verl's GRPO advantages over SaEI
groups (clean + adversarial rows of one uid)."""

import numpy as np
import pytest
import torch
from verl.trainer.ppo import core_algos

from saei_fast import pixels
from saei_fast.attack import AttackConfig, entropy_attack, pixel_gradient
from saei_fast.integrations.verl.worker import run_groups, saei_attack_on
from saei_fast.reference import group_advantages_reference as reference_advantages
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)


def _group(model, processor, seed):
    batch = vlm_batch(
        model, processor, random_images(1, (56, 56), seed=seed), group_size=3, seed=seed
    )
    image_rows = batch.inputs["pixel_values"].shape[0] // 3
    return {
        **batch.inputs,
        "completion_mask": batch.completion_mask,
        "image_rows": image_rows,
    }, batch


def test_worker_gradient_matches_pixel_gradient():
    torch.manual_seed(0)
    model = tiny_qwen2_5_vl(seed=0)
    processor = tiny_qwen_image_processor()
    space = pixels.from_processor(processor)
    config = AttackConfig(alpha=2 / 255, micro_batch_size=2)
    groups, batches = zip(*(_group(model, processor, seed) for seed in (1, 2)), strict=True)
    model.train()  # the worker restores whatever mode it found
    results = run_groups(model, list(groups), space=space, config=config, mode="gradient")
    assert model.training
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    for result, group, batch in zip(results, groups, batches, strict=True):
        expected = pixel_gradient(
            model.eval(),
            batch.inputs,
            batch.completion_mask,
            space=space,
            config=AttackConfig(group_size=3),
        )
        rows = group["image_rows"]
        summed = expected.grad.reshape(3, rows, -1).sum(0)
        torch.testing.assert_close(result["grad"].reshape(rows, -1), summed, rtol=1e-5, atol=1e-7)
        # micro-batches of 2 rows sum the objective in another order: float32 rounding
        assert result["objective"] == pytest.approx(expected.objective, rel=1e-6)
        assert float(summed.abs().sum()) > 0


def test_worker_attack_matches_entropy_attack():
    from verl import DataProto

    model = tiny_qwen2_5_vl(seed=0)
    processor = tiny_qwen_image_processor()
    space = pixels.from_processor(processor)
    group, batch = _group(model, processor, seed=3)
    column = np.empty(1, dtype=object)
    column[:] = [group]
    data = DataProto.from_dict(
        non_tensors={"saei_group": column},
        meta_info={"saei_space": space, "saei_config": AttackConfig(), "saei_mode": "attack"},
    )
    result = saei_attack_on(model, data).non_tensor_batch["saei_result"][0]
    expected = entropy_attack(
        model, batch.inputs, batch.completion_mask, space=space, config=AttackConfig(group_size=3)
    )
    rows = group["image_rows"]
    torch.testing.assert_close(result["pixel_values"], expected.pixel_values[:rows])
    assert result["entropy_before"] == expected.entropy_before
    # exact uint8 PIL: the step is k/255 of an image already at the processor's size
    clean = np.asarray(
        space.to_pil(
            batch.inputs["pixel_values"][:rows], image_grid_thw=batch.inputs["image_grid_thw"][:1]
        )[0],
        dtype=np.int16,
    )
    adv = np.asarray(
        space.to_pil(result["pixel_values"], image_grid_thw=batch.inputs["image_grid_thw"][:1])[0],
        dtype=np.int16,
    )
    assert np.abs(adv - clean).max() == 2


def test_grpo_advantages_over_clean_and_adversarial_rows():
    generator = torch.Generator().manual_seed(0)
    n_clean, n_adv, groups = 6, 6, 3
    rows = groups * (n_clean + n_adv)
    rewards = torch.randint(0, 2, (rows,), generator=generator).float()
    uids = np.array([f"uid-{row // (n_clean + n_adv)}" for row in range(rows)], dtype=object)
    mask = torch.ones(rows, 5)
    token_rewards = torch.zeros(rows, 5)
    token_rewards[:, -1] = rewards
    advantages, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, uids)
    expected = reference_advantages(rewards.double(), n_clean + n_adv)
    torch.testing.assert_close(advantages[:, -1].double(), expected, rtol=1e-5, atol=1e-5)
