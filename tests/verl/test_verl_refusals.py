"""Start-up refusals of settings that would score SaEI's adversarial rows with the rollout
engine's (perturbed-image) log-probs, checked on verl's own full default trainer config
(``verl/trainer/config/_generated_ppo_trainer.yaml``): its defaults pass, each setting
flipped is refused with its name."""

import re
from pathlib import Path

import pytest
import verl
from omegaconf import OmegaConf

from saei_fast.integrations.verl.config import settings_from_trainer_config

VERL_CONFIG = Path(verl.__file__).parent / "trainer/config/_generated_ppo_trainer.yaml"


def verl_saei_config(**overrides):
    """verl's default trainer config with the keys a SaEI run sets."""
    config = OmegaConf.load(VERL_CONFIG)
    settings = {
        "saei": {"n_clean": 6, "n_adv": 6},
        "actor_rollout_ref.rollout.n": 12,
        "actor_rollout_ref.rollout.agent.default_agent_loop": "saei_agent",
        "data.train_batch_size": 8,
        **overrides,
    }
    for key, value in settings.items():
        OmegaConf.update(config, key, value, force_add=True)
    return config


def test_verl_defaults_pass():
    config = verl_saei_config()
    # the settings exist in verl's config with the values SaEI accepts
    assert config.algorithm.rollout_correction.bypass_mode is False
    assert config.algorithm.rollout_correction.rollout_is is None
    assert config.algorithm.rollout_correction.rollout_rs is None
    assert settings_from_trainer_config(config).group_size == 12


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("algorithm.rollout_correction.bypass_mode", True),
        ("algorithm.rollout_correction.rollout_is", "token"),
        ("algorithm.rollout_correction.rollout_is", "sequence"),
        ("algorithm.rollout_correction.rollout_rs", "token_k1"),
        ("actor_rollout_ref.actor.use_rollout_log_probs", True),
    ],
)
def test_rollout_log_prob_settings_are_refused(key, value):
    expected = re.escape(f"{key}={value!r} is not supported with SaEI")
    with pytest.raises(ValueError, match=f"^{expected}"):
        settings_from_trainer_config(verl_saei_config(**{key: value}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("algorithm.rollout_correction.bypass_mode", False),
        ("actor_rollout_ref.actor.use_rollout_log_probs", False),
        ("algorithm.rollout_correction.rollout_is_threshold", 5.0),  # inert without rollout_is
    ],
)
def test_boundary_values_pass(key, value):
    settings_from_trainer_config(verl_saei_config(**{key: value}))


def test_ulysses_sequence_parallel_is_refused_at_start_up():
    key = "actor_rollout_ref.actor.ulysses_sequence_parallel_size"
    settings_from_trainer_config(verl_saei_config(**{key: 1}))
    with pytest.raises(ValueError, match=re.escape(f"{key} must be 1") + ".*got 2"):
        settings_from_trainer_config(verl_saei_config(**{key: 2}))


@pytest.mark.parametrize("value", [0, -1.0])
def test_attack_timeout_must_be_positive(value):
    with pytest.raises(ValueError, match=r"saei\.attack_timeout_s"):
        settings_from_trainer_config(verl_saei_config(**{"saei.attack_timeout_s": value}))
