"""SaEIGRPOTrainer with groups split unevenly between clean and adversarial rows (3 + 1, and
1 + 3: the attack then sees groups of one row), through TRL's scoring on a tiny Qwen2.5-VL.

Every other trainer test uses 2 + 2, where ``n_clean`` used for ``n_adv`` (or the other way
round) anywhere in the layout, the attack's grouping or the per-arm metrics gives the right
answer. The expected values come from what ``generate`` received and returned and from the
rewards the reward function computed.
"""

from __future__ import annotations

import pytest
import torch
from trl_helpers import (
    ALPHA,
    TRAINER_MARKS,
    ModelRecorder,
    Rewards,
    image_blocks,
    index_of,
    make_trainer,
)

import saei_fast
import saei_fast.integrations.trl.sampling as integration
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = TRAINER_MARKS

GROUP = 4


@pytest.mark.parametrize("n_clean,n_adv", [(3, 1), (1, 3)])
def test_uneven_group_split_layout_images_advantages_and_metrics(
    processor, examples, tmp_path, monkeypatch, n_clean, n_adv
):
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    recorder = ModelRecorder(model)
    rewards = Rewards()
    trainer = make_trainer(
        model,
        processor,
        to_dataset(examples),
        tmp_path,
        reward_funcs=rewards,
        num_generations=GROUP,
        saei_n_clean=n_clean,
        saei_n_adv=n_adv,
        per_device_train_batch_size=2 * GROUP,
    )
    attacks = []
    original = integration.entropy_attack

    def recording(model, inputs, completion_mask, *, config, **kwargs):
        attacks.append({"rows": inputs["input_ids"].shape[0], "config": config})
        return original(model, inputs, completion_mask, config=config, **kwargs)

    monkeypatch.setattr(integration, "entropy_attack", recording)
    trainer.model.train()
    inputs = [dict(trainer.train_dataset[i]) for i in (0, 1) for _ in range(GROUP)]
    output = trainer._generate_and_score_completions(inputs)

    # Two generate calls of n_clean and n_adv rows per prompt; one attack on the clean rows,
    # grouped by prompt.
    clean_call, adv_call = recorder.generate_calls
    assert len(clean_call["input_ids"]) == 2 * n_clean
    assert len(adv_call["input_ids"]) == 2 * n_adv
    (attack,) = attacks
    assert attack["rows"] == 2 * n_clean and attack["config"].group_size == n_clean

    # Each prompt's adversarial rows carry an image alpha away from that prompt's clean one.
    clean = processor.image_processor([e.image for e in examples], return_tensors="pt")
    clean_blocks = image_blocks(clean["pixel_values"])
    clean_owners = [index_of(b, clean_blocks) for b in image_blocks(clean_call["pixel_values"])]
    prompt_of_group = clean_owners[::n_clean]
    assert clean_owners == [p for p in prompt_of_group for _ in range(n_clean)]
    space = saei_fast.pixels.from_processor(processor)
    grid = clean["image_grid_thw"][:1]
    adv_blocks = image_blocks(adv_call["pixel_values"])
    for group, prompt in enumerate(prompt_of_group):
        rows = adv_blocks[group * n_adv : (group + 1) * n_adv]
        assert all(torch.equal(rows[0], row) for row in rows)
        (adv,) = space.to_images(rows[0], image_grid_thw=grid)
        (own,) = space.to_images(clean_blocks[prompt], image_grid_thw=grid)
        (other,) = space.to_images(clean_blocks[1 - prompt], image_grid_thw=grid)
        assert (adv - own).abs().max() <= ALPHA + 1e-5
        assert (adv - other).abs().max() > 2 * ALPHA

    # Row layout: per group, its n_clean clean rows, then its n_adv adversarial rows.
    completions = output["completion_ids"]
    is_adv = torch.tensor([False] * n_clean + [True] * n_adv).repeat(2)
    assert torch.equal(output["saei_is_adversarial"].cpu(), is_adv)
    for group in range(2):
        first = group * GROUP
        for j in range(n_clean):
            want = clean_call["completions"][group * n_clean + j]
            assert torch.equal(completions[first + j, : len(want)], want)
        for j in range(n_adv):
            want = adv_call["completions"][group * n_adv + j]
            assert torch.equal(completions[first + n_clean + j, : len(want)], want)

    # Advantages over the whole group of n_clean + n_adv rows; per-arm reward means over
    # rows (3 rows of one arm weigh 3 times one row of the other).
    (values,) = rewards.calls
    values = torch.tensor(values, dtype=torch.float64)
    expected = saei_fast.group_advantages(values, GROUP, eps=1e-4)
    torch.testing.assert_close(output["advantages"].double(), expected, rtol=1e-5, atol=1e-6)
    metrics = trainer._metrics["train"]
    assert metrics["saei/reward_clean"][-1] == pytest.approx(float(values[~is_adv].mean()))
    assert metrics["saei/reward_adv"][-1] == pytest.approx(float(values[is_adv].mean()))
    for name, arm, n in (("clean", clean_call, n_clean), ("adv", adv_call, n_adv)):
        rows = arm["completions"]
        distinct = [len({tuple(r.tolist()) for r in rows[g * n : (g + 1) * n]}) for g in (0, 1)]
        assert metrics[f"saei/distinct_{name}"][-1] == pytest.approx(sum(distinct) / 2)


def test_a_batch_of_one_prompt(processor, examples, tmp_path, monkeypatch):
    """One prompt per generation batch (one group): the attack, the per-group metrics (a
    median and a fraction over a single group) and the layout still hold."""
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    recorder = ModelRecorder(model)
    trainer = make_trainer(
        model,
        processor,
        to_dataset(examples),
        tmp_path,
        num_generations=GROUP,
        saei_n_clean=2,
        saei_n_adv=2,
        per_device_train_batch_size=GROUP,
    )
    results = []
    original = integration.entropy_attack

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(integration, "entropy_attack", recording)
    trainer.model.train()
    inputs = [dict(trainer.train_dataset[1]) for _ in range(GROUP)]
    output = trainer._generate_and_score_completions(inputs)

    clean_call, adv_call = recorder.generate_calls
    assert len(clean_call["input_ids"]) == 2 and len(adv_call["input_ids"]) == 2
    (result,) = results
    assert result.group_entropy_before.shape == (1,)
    relative = float(result.group_entropy_after[0] / result.group_entropy_before[0] - 1)
    metrics = trainer._metrics["train"]
    assert metrics["saei/entropy_gain_relative"][-1] == pytest.approx(relative, rel=1e-9)
    assert metrics["saei/gain_negative_fraction"][-1] == float(relative < 0)
    clean = processor.image_processor([examples[1].image], return_tensors="pt")
    space = saei_fast.pixels.from_processor(processor)
    grid = clean["image_grid_thw"]
    (own,) = space.to_images(clean["pixel_values"], image_grid_thw=grid)
    for block in image_blocks(adv_call["pixel_values"]):
        (adv,) = space.to_images(block, image_grid_thw=grid)
        assert 0 < (adv - own).abs().max() <= ALPHA + 1e-5
    assert output["saei_is_adversarial"].tolist() == [False, False, True, True]
