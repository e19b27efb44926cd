"""Every ``saei_*`` setting reaches the attack: ``SaEIConfig.attack_config()`` with each one
away from its default.

The trainer tests run the attack with default settings, and the config tests check what is
refused; a setting dropped on its way to ``AttackConfig`` (the attack then runs with the
default) passes both.
"""

from __future__ import annotations

import pytest
from trl_helpers import make_config

from saei_fast import AttackConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is deprecated and will be removed in v6:FutureWarning"
)

# (SaEIConfig settings, the AttackConfig field, its expected value); none is the default.
CASES = [
    ({"saei_alpha": 3 / 255}, "alpha", 3 / 255),
    ({"saei_steps": 3}, "steps", 3),
    ({"saei_eps": 5 / 255}, "eps", 5 / 255),
    ({"saei_band": [0.0, 0.5]}, "band", (0.0, 0.5)),
    ({"saei_scope": "batch"}, "scope", "batch"),
    ({"saei_scope": "sequence"}, "scope", "sequence"),
    ({"saei_micro_batch_size": 3}, "micro_batch_size", 3),
    ({"saei_perturbation": "random"}, "perturbation", "random"),
    (
        {
            "num_generations": 6,
            "saei_n_clean": 4,
            "saei_n_adv": 2,
            "per_device_train_batch_size": 6,
        },
        "group_size",
        4,
    ),
    ({"temperature": 0.7}, "temperature", 0.7),
]


@pytest.mark.parametrize(
    "settings,field,expected", CASES, ids=[c[1] + "=" + str(c[2]) for c in CASES]
)
def test_each_setting_reaches_the_attack_config(tmp_path, settings, field, expected):
    attack = make_config(tmp_path, **settings).attack_config()
    assert getattr(attack, field) == expected
    assert getattr(AttackConfig(), field) != expected  # not the default
