"""SaEIGRPOTrainer settings: the random-perturbation control, the sampling temperature the
attack uses, settings validated at construction, and evaluation without SaEI sampling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from trl_helpers import (
    GROUP,
    N_ADV,
    N_CLEAN,
    TRAINER_MARKS,
    ModelRecorder,
    Rewards,
    image_blocks,
    index_of,
    make_config,
    make_trainer,
)

import saei_fast
import saei_fast.integrations.trl.sampling as integration
from saei_fast.integrations.trl import SaEIConfig, SaEIGRPOTrainer
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = TRAINER_MARKS


def recorded_attacks(monkeypatch) -> list[dict]:
    calls, original = [], integration.entropy_attack

    def recording(*args, config, generator=None, **kwargs):
        result = original(*args, config=config, generator=generator, **kwargs)
        calls.append({"config": config, "generator": generator, "result": result})
        return result

    monkeypatch.setattr(integration, "entropy_attack", recording)
    return calls


def forbid_attacks(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("entropy_attack must not run here")

    monkeypatch.setattr(integration, "entropy_attack", fail)


# ---- the random-perturbation control ----------------------------------------------------------


def test_random_control_arm_steps_alpha_in_random_directions(
    processor, examples, tmp_path, monkeypatch
):
    alpha = 4 / 255
    model = demo_model(processor, hidden_size=32, seed=0)
    recorder = ModelRecorder(model)
    attacks = recorded_attacks(monkeypatch)
    trainer = make_trainer(
        model,
        processor,
        to_dataset(examples),
        tmp_path,
        saei_perturbation="random",
        saei_alpha=alpha,
        max_steps=1,
        # The attack measures at the temperature TRL samples at, this one included.
        generation_kwargs={"temperature": 0.7},
    )
    config = trainer.args
    trainer.train()

    (attack,) = attacks
    assert attack["config"].perturbation == "random"
    assert attack["config"].temperature == 0.7 and config.temperature == 1.0
    assert isinstance(attack["generator"], torch.Generator)
    clean_call, adv_call = recorder.generate_calls
    clean = processor.image_processor([e.image for e in examples], return_tensors="pt")
    clean_blocks = image_blocks(clean["pixel_values"])
    owners = [index_of(b, clean_blocks) for b in image_blocks(clean_call["pixel_values"])]
    space = saei_fast.pixels.from_processor(processor)
    grid = clean["image_grid_thw"][:1]
    adv_blocks = image_blocks(adv_call["pixel_values"])
    for group in range(2):
        rows = adv_blocks[group * N_ADV : (group + 1) * N_ADV]
        assert all(torch.equal(rows[0], row) for row in rows)
        (adv,) = space.to_images(rows[0], image_grid_thw=grid)
        (image,) = space.to_images(clean_blocks[owners[group * N_CLEAN]], image_grid_thw=grid)
        change = (adv - image).abs()
        inside = (image >= alpha) & (image <= 1 - alpha)  # where the clip cannot act
        assert torch.allclose(change[inside], torch.full_like(change[inside], alpha), atol=1e-6)
        up = float(((adv - image) > 0).double().mean())
        assert 0.4 < up < 0.6  # random signs, not the gradient's
    entry = next(e for e in trainer.state.log_history if "reward" in e)
    result = attack["result"]
    assert entry["saei/entropy_before"] == pytest.approx(result.entropy_before, rel=1e-12)
    assert entry["saei/entropy_after"] == pytest.approx(result.entropy_after, rel=1e-12)
    for key in ("entropy_gain_relative", "gain_negative_fraction", "distinct_adv"):
        assert math.isfinite(entry[f"saei/{key}"])


def test_random_signs_are_seeded_by_seed_step_and_process(processor, examples, tmp_path):
    model = demo_model(processor, hidden_size=32, seed=0)

    def random_control(seed):
        return make_trainer(
            model,
            processor,
            to_dataset(examples),
            tmp_path,
            full_length=False,
            saei_perturbation="random",
            seed=seed,
        )

    trainer = random_control(5)
    draws = {}
    for step in (0, 0, 1):
        trainer.state.global_step = step
        draws.setdefault(step, []).append(torch.rand(8, generator=trainer._saei_generator()))
    assert torch.equal(draws[0][0], draws[0][1])
    assert not torch.equal(draws[0][0], draws[1][0])
    other = random_control(6)
    other.state.global_step = 0
    assert not torch.equal(torch.rand(8, generator=other._saei_generator()), draws[0][0])


# ---- settings validated at construction --------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_rejected_at_construction(tmp_path, enabled, temperature):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        make_config(tmp_path, temperature=temperature, saei_enabled=enabled)


def test_bad_generation_kwargs_temperature_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"generation_kwargs\['temperature'\]: temperature must"):
        make_config(tmp_path, generation_kwargs={"temperature": 0})
    with pytest.raises(TypeError, match=r"generation_kwargs\['temperature'\]: temperature must"):
        make_config(tmp_path, generation_kwargs={"temperature": "hot"})


def test_attack_temperature_is_the_effective_sampling_temperature(tmp_path):
    assert make_config(tmp_path, temperature=0.9).attack_config().temperature == 0.9
    config = make_config(tmp_path, temperature=0.9, generation_kwargs={"temperature": 0.6})
    assert config.sampling_temperature() == 0.6
    assert config.attack_config().temperature == 0.6


def test_bad_perturbation_is_rejected(tmp_path):
    with pytest.raises(
        ValueError, match=r"saei_perturbation must be one of \('entropy', 'random'\)"
    ):
        make_config(tmp_path, saei_perturbation="gaussian")


def test_disabled_saei_never_builds_the_attack(processor, examples, tmp_path, monkeypatch):
    def fail(self):
        raise AssertionError("attack_config must not be built with saei_enabled=False")

    monkeypatch.setattr(SaEIConfig, "attack_config", fail)
    trainer = make_trainer(
        demo_model(processor, hidden_size=32, seed=0),
        processor,
        to_dataset(examples),
        tmp_path,
        full_length=False,
        saei_enabled=False,
    )
    assert trainer._saei_attack_config is None and trainer._saei_space is None


# ---- evaluation samples from clean images only ---------------------------------------------------


def test_evaluation_loop_generates_from_clean_images_without_attack(
    processor, examples, tmp_path, monkeypatch
):
    model = demo_model(processor, hidden_size=32, seed=0)
    recorder = ModelRecorder(model)
    forbid_attacks(monkeypatch)
    dataset = to_dataset(examples)
    trainer = make_trainer(
        model,
        processor,
        dataset,
        tmp_path,
        eval_dataset=dataset,
        per_device_eval_batch_size=2 * GROUP,
        eval_strategy="no",
    )
    metrics = trainer.evaluate()  # the trainer's own evaluation loop (model in eval mode)

    assert "eval_loss" in metrics
    assert not any("saei/" in key for key in metrics)
    (call,) = recorder.generate_calls  # one call: no separate clean/adversarial generation
    clean = processor.image_processor([e.image for e in examples], return_tensors="pt")
    clean_blocks = image_blocks(clean["pixel_values"])
    owners = sorted(index_of(b, clean_blocks) for b in image_blocks(call["pixel_values"]))
    assert owners == [0] * GROUP + [1] * GROUP


def test_vllm_with_a_tiling_image_processor_is_refused_at_construction(
    processor, examples, tmp_path
):
    tiling = copy.deepcopy(processor)
    tiling.image_processor.do_image_splitting = True  # what Idefics3 / SmolVLM processors set
    for use_vllm in (True, False):
        config = make_config(tmp_path)
        config.use_vllm = use_vllm  # TRL would need vLLM installed to get further than this
        build = lambda config=config: SaEIGRPOTrainer(
            model=demo_model(processor, hidden_size=32, seed=0),
            reward_funcs=Rewards(),
            args=config,
            train_dataset=to_dataset(examples),
            processing_class=tiling,
        )
        if use_vllm:
            with pytest.raises(ValueError, match="does not support image processors that tile"):
                build()
        else:
            build()  # Hugging Face generate: unchanged
