"""SaEIGRPOTrainer on prompts of different lengths: one image of 56 x 56 (4 image tokens)
and one of 28 x 56 (2 image tokens) in the same batch, so TRL left-pads the shorter prompt,
through a real training step on a tiny Qwen2.5-VL.

Every other trainer test has prompts of one length, where a per-token field (Qwen's
``mm_token_type_ids``) padded on the wrong side, or an attack batch whose prompt padding
differs from the generation batch's, still lines up. The attack's objective is checked
against the naive full-logits objective of the generate call's own padded rows, and the loss
forward's entropy metrics against a plain forward.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from trl_helpers import ALPHA, N_ADV, N_CLEAN, TRAINER_MARKS, make_trainer
from trl_variations import GenerateRecorder, attack_beside_naive, record_loss_calls

import saei_fast
import saei_fast.integrations.trl.sampling as integration
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import colour_examples, to_dataset

pytestmark = TRAINER_MARKS


def test_prompts_of_different_lengths(processor, tmp_path, monkeypatch):
    examples = colour_examples(2, seed=8)
    examples[1] = dataclasses.replace(examples[1], image=examples[1].image.resize((28, 56)))
    torch.manual_seed(0)
    model = demo_model(processor, hidden_size=32, seed=0)
    with torch.no_grad():  # spread the entropies (a random tiny model is near uniform)
        model.lm_head.weight.mul_(30.0)
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    recorder = GenerateRecorder(model)
    trainer = make_trainer(model, processor, to_dataset(examples), tmp_path, max_steps=1)
    attacks = []
    monkeypatch.setattr(
        integration, "entropy_attack", attack_beside_naive(recorder, eos, pad, attacks)
    )
    losses = record_loss_calls(trainer)
    trainer.train()

    # Both generate calls hold prompts of two lengths, the shorter left-padded.
    for call in recorder.inputs:
        lengths = call["attention_mask"].sum(1).unique()
        assert len(lengths) == 2 and int(lengths[1] - lengths[0]) == 2
        assert not call["attention_mask"][:, 0].all()
    (only,) = attacks
    assert only["result"].entropy_before == pytest.approx(only["naive"], rel=1e-4)

    # Each group's adversarial rows carry an image of its own size, alpha from its own.
    space = saei_fast.pixels.from_processor(processor)
    clean_call, adv_call = recorder.inputs
    clean_images = space.to_images(
        clean_call["pixel_values"], image_grid_thw=clean_call["image_grid_thw"]
    )
    adv_images = space.to_images(
        adv_call["pixel_values"], image_grid_thw=adv_call["image_grid_thw"]
    )
    for group in range(2):
        clean = clean_images[group * N_CLEAN]
        for row in range(group * N_ADV, (group + 1) * N_ADV):
            assert adv_images[row].shape == clean.shape
            change = (adv_images[row] - clean).abs()
            assert change.max() <= ALPHA + 1e-5 and (change > ALPHA / 2).float().mean() > 0.5

    # The loss forward (left-padded prompts of two lengths): TRL's entropy and SaEI's split.
    (record,) = losses
    assert not record["prompt_mask"][:, 0].all()
    (entry,) = [e for e in trainer.state.log_history if "reward" in e]
    mask = record["completion_mask"].bool()
    assert mask.all()  # full-length completions: only the prompts vary
    entropies = record["entropies"]
    adversarial = record["saei_is_adversarial"].bool()
    assert entry["entropy"] == pytest.approx(float(entropies.mean()), rel=1e-5)
    for name, rows in (("clean", ~adversarial), ("adv", adversarial)):
        assert entry[f"saei/entropy_{name}_rows"] == pytest.approx(
            float(entropies[rows].mean()), rel=1e-5
        )
