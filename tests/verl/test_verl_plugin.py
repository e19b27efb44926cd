"""Plugin discovery through the entry point, lazy registration, config validation."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from saei_fast.integrations.verl.config import SaEISettings, settings_from_trainer_config

DISCOVERY = """
import sys, verl
lazy = [m for m in ("verl.experimental.agent_loop.agent_loop", "verl.trainer.ppo.v1.trainer_base")
        if m in sys.modules]
from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
from verl.trainer.ppo.v1 import get_trainer_cls
print("LAZY", lazy)
print("AGENT", _agent_loop_registry["saei_agent"]["_target_"])
print("TRAINER", get_trainer_cls("saei_sync").__name__)
"""


def test_entry_point_registers_from_fresh_interpreter():
    out = subprocess.run(
        [sys.executable, "-c", DISCOVERY], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert "LAZY []" in out  # nothing heavy at `import verl`
    assert "AGENT saei_fast.integrations.verl.agent_loop.SaEIAgentLoop" in out
    assert "TRAINER SaEITrainer" in out


def test_plugins_none_disables_registration():
    code = "import verl, sys; print('saei_fast.integrations.verl.plugin' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**__import__("os").environ, "VERL_USE_EXTERNAL_PLUGINS": "none"},
    ).stdout
    assert out.strip().endswith("False")


def test_registration_failure_is_logged_loudly(caplog):
    from saei_fast.integrations.verl import plugin

    class Broken:  # a registry module without the attributes the hook needs
        pass

    plugin.REGISTRATION_ERRORS.clear()
    before = 0
    with caplog.at_level("ERROR", logger="saei_fast.integrations.verl"):
        plugin._run_hook("verl.trainer.ppo.v1.trainer_base", Broken())
    assert len(plugin.REGISTRATION_ERRORS) == before + 1
    assert any(r.levelname == "ERROR" and "could not register" in r.message for r in caplog.records)
    del plugin.REGISTRATION_ERRORS[before:]


def _config(**overrides):
    base = {
        "saei": {"n_clean": 6, "n_adv": 6, "alpha": 2 / 255},
        "data": {"train_batch_size": 8},
        "algorithm": {"rollout_correction": {"rollout_is": None, "rollout_rs": None}},
        "actor_rollout_ref": {
            "rollout": {
                "n": 12,
                "val_kwargs": {"n": 1},
                "agent": {"default_agent_loop": "saei_agent", "num_workers": 8},
            }
        },
    }
    config = OmegaConf.create(base)
    for key, value in overrides.items():
        OmegaConf.update(config, key, value, force_add=True)
    return config


def test_valid_config():
    settings = settings_from_trainer_config(_config())
    assert (settings.n_clean, settings.n_adv, settings.steps) == (6, 6, 1)
    assert settings.band == (1 / 3, 2 / 3)
    assert settings.perturbation == "entropy"


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("actor_rollout_ref.rollout.n", 8, ValueError, "rollout.n must equal"),
        (
            "actor_rollout_ref.rollout.agent.default_agent_loop",
            "single_turn_agent",
            ValueError,
            "saei_agent",
        ),
        ("data.train_batch_size", 12, ValueError, "num_workers"),
        ("actor_rollout_ref.rollout.val_kwargs.n", 8, ValueError, "val_kwargs.n"),
        ("algorithm.rollout_correction.rollout_is", "token", ValueError, "rollout_correction"),
        ("saei.alpha", -1.0, ValueError, "saei.alpha"),
        ("saei.n_clean", 0, ValueError, "saei.n_clean"),
        ("saei.steps", 1.5, TypeError, "saei.steps"),
        ("saei.scope", "token", ValueError, "saei.scope"),
        ("saei.perturbation", "gaussian", ValueError, "saei.perturbation"),
        ("saei.band", [0.7, 0.2], ValueError, "saei"),
        ("saei.nclean", 6, ValueError, "unknown keys"),
    ],
)
def test_bad_config_is_refused(key, value, error, match):
    with pytest.raises(error, match=match):
        settings_from_trainer_config(_config(**{key: value}))


def test_missing_block():
    config = _config()
    del config["saei"]
    with pytest.raises(ValueError, match="no 'saei' block"):
        settings_from_trainer_config(config)


def test_settings_round_trip():
    settings = SaEISettings(n_clean=4, n_adv=2, perturbation="random")
    assert SaEISettings.from_mapping(settings.to_dict()) == settings
