"""The example recipe (``examples/verl/qwen2_5_vl_7b_geo3k_saei.sh``) composes with verl's own
trainer config (Hydra, as ``verl.trainer.main_ppo`` composes it) into a config the SaEI
trainer accepts, and that selects the paths the tests cover: the SaEI trainer class, verl's
sync mode, the ``saei_agent`` loop, the engine settings the actor attack supports."""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.v1 import get_trainer_cls

from saei_fast.integrations.verl.config import settings_from_trainer_config
from saei_fast.integrations.verl.trainer import SaEITrainer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "verl"


def _script_overrides() -> list[str]:
    """The ``key=value`` arguments the script passes to ``verl.trainer.main_ppo``, with the
    shell variables of paths given placeholder values."""
    text = (EXAMPLES / "qwen2_5_vl_7b_geo3k_saei.sh").read_text()
    command = text[text.index("python3 -m verl.trainer.main_ppo") :].replace("\\\n", " ")
    words = shlex.split(command.replace('"$@"', ""))
    overrides = [w for w in words if "=" in w and not w.startswith("--")]
    variables = {"$DATA": "/data/geo3k", "$MODEL": "/models/Qwen2.5-VL-7B-Instruct"}
    return [re.sub(r"\$\w+", lambda m: variables[m.group(0)], w) for w in overrides]


@pytest.fixture(scope="module")
def config():
    with initialize_config_dir(config_dir=str(EXAMPLES), version_base=None):
        return compose("qwen2_5_vl_7b_geo3k_saei_trainer", overrides=_script_overrides())


def test_the_example_composes_into_a_config_the_saei_trainer_accepts(config):
    settings = settings_from_trainer_config(config)
    assert (settings.n_clean, settings.n_adv, settings.alpha) == (6, 6, pytest.approx(2 / 255))
    assert get_trainer_cls(config.trainer.v1.trainer_mode) is SaEITrainer
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == "saei_agent"


def test_the_example_uses_engine_settings_the_attack_supports(config):
    actor = config.actor_rollout_ref
    assert actor.model.use_remove_padding is True  # packed rows: tested on the CPU
    assert actor.model.enable_gradient_checkpointing is True  # the attack checkpoints too
    assert actor.actor.ulysses_sequence_parallel_size == 1  # Ulysses SP is refused
    assert config.algorithm.rollout_correction.bypass_mode is False
