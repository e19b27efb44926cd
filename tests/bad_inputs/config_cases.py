"""Catalogue: ``saei_fast.AttackConfig`` and ``saei_fast.integrations.trl.SaEIConfig``.

Both validate on construction, so a bad setting fails where it is written, not later inside
an attack or a trainer (``SaEIConfig(temperature=0)`` used to pass and fail in
``SaEIGRPOTrainer.__init__``, also with ``saei_enabled=False``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from bad_inputs.core import Raises, Returns, table
from saei_fast import AttackConfig

# SaEIConfig never creates its output_dir on construction; the test checks this one stays absent.
OUTPUT_DIR = Path(tempfile.gettempdir()) / "saei-catalogue-never-created"


def _attack_config(error, names, **settings) -> tuple:
    return lambda _impl: AttackConfig(**settings), Raises(error, names)


def _attack_config_value(expected: dict, **settings) -> tuple:
    # repr: the stored values must be floats and tuples, not the ints and lists passed
    def call(_impl):
        config = AttackConfig(**settings)
        return repr(tuple(getattr(config, name) for name in expected))

    return call, Returns(lambda: repr(tuple(expected.values())), dtype=None)


ATTACK_ENTRY = {
    **{
        f"attack-config/{name}-{label}": _attack_config(error, name, **{name: value})
        for name, cases in {
            "alpha": (
                ("0", 0.0, ValueError),
                ("negative", -2 / 255, ValueError),
                ("nan", math.nan, ValueError),
                ("inf", math.inf, ValueError),
                ("bool", True, TypeError),
                ("str", "2/255", TypeError),
                ("none", None, TypeError),
            ),
            "steps": (
                ("0", 0, ValueError),
                ("negative", -1, ValueError),
                ("float", 1.0, TypeError),
                ("bool", True, TypeError),
            ),
            "eps": (
                ("0", 0.0, ValueError),
                ("negative", -0.1, ValueError),
                ("nan", math.nan, ValueError),
                ("str", "8/255", TypeError),
            ),
            "band": (
                ("reversed", (2 / 3, 1 / 3), ValueError),
                ("equal", (0.5, 0.5), ValueError),
                ("above-1", (0.5, 1.5), ValueError),
                ("nan", (math.nan, 0.5), ValueError),
                ("scalar", 0.5, TypeError),
                ("three", (0.1, 0.2, 0.3), TypeError),
            ),
            "scope": (("unknown", "token", ValueError), ("none", None, ValueError)),
            "group_size": (("0", 0, ValueError), ("float", 2.0, TypeError)),
            "temperature": (
                ("0", 0.0, ValueError),
                ("negative", -1.0, ValueError),
                ("nan", math.nan, ValueError),
                ("inf", math.inf, ValueError),
                ("1e-39", 1e-39, ValueError),
                ("bool", True, TypeError),
                ("str", "1.0", TypeError),
            ),
            "micro_batch_size": (("0", 0, ValueError), ("float", 2.5, TypeError)),
            "measure_after": (("int", 1, TypeError), ("str", "yes", TypeError)),
            "perturbation": (("unknown", "gaussian", ValueError),),
        }.items()
        for label, value, error in cases
    },
    "attack-config/normalised": _attack_config_value(
        {"alpha": 0.5, "band": (0.0, 1.0), "temperature": 2.0},
        alpha=0.5,
        band=[0, 1],
        temperature=2,
    ),
}


_BASE = {
    "output_dir": str(OUTPUT_DIR),
    "num_generations": 4,
    "per_device_train_batch_size": 4,
    "use_cpu": True,
    "report_to": "none",
}


def _saei_config(error, names, **settings) -> tuple:
    def call(_impl):
        from saei_fast.integrations.trl import SaEIConfig

        return SaEIConfig(**{**_BASE, **settings})

    return call, Raises(error, names)


SAEI_ENTRY = {
    **{
        f"saei-config/temperature-{label}{'-disabled' if not enabled else ''}": _saei_config(
            error, "temperature", temperature=value, saei_enabled=enabled
        )
        for label, value, error in (
            ("0", 0.0, ValueError),
            ("negative", -0.7, ValueError),
            ("nan", math.nan, ValueError),
            ("inf", math.inf, ValueError),
            ("1e-39", 1e-39, ValueError),
            ("str", "1.0", TypeError),
        )
        for enabled in (True, False)
    },
    "saei-config/generation-kwargs-temperature-0": _saei_config(
        ValueError, "temperature", generation_kwargs={"temperature": 0}
    ),
    "saei-config/enabled-str": _saei_config(TypeError, "saei_enabled", saei_enabled="yes"),
    "saei-config/fused-head-int": _saei_config(TypeError, "saei_fused_head", saei_fused_head=1),
    "saei-config/split-not-the-group": _saei_config(
        ValueError, "saei_n_clean", saei_n_clean=3, saei_n_adv=3
    ),
    "saei-config/n-clean-0": _saei_config(ValueError, "saei_n_clean", saei_n_clean=0),
    "saei-config/n-adv-float": _saei_config(TypeError, "saei_n_adv", saei_n_adv=2.0),
    "saei-config/alpha-0": _saei_config(ValueError, "saei_alpha", saei_alpha=0.0),
    "saei-config/alpha-nan": _saei_config(ValueError, "saei_alpha", saei_alpha=math.nan),
    "saei-config/steps-0": _saei_config(ValueError, "saei_steps", saei_steps=0),
    "saei-config/eps-negative": _saei_config(ValueError, "saei_eps", saei_eps=-0.1),
    "saei-config/band-reversed": _saei_config(ValueError, "saei_band", saei_band=[0.6, 0.2]),
    "saei-config/band-nan": _saei_config(ValueError, "saei_band", saei_band=[math.nan, 0.5]),
    "saei-config/band-scalar": _saei_config(TypeError, "saei_band", saei_band=0.5),
    "saei-config/scope-unknown": _saei_config(ValueError, "saei_scope", saei_scope="prompt"),
    "saei-config/perturbation-unknown": _saei_config(
        ValueError, "saei_perturbation", saei_perturbation="gaussian"
    ),
    "saei-config/micro-batch-0": _saei_config(
        ValueError, "saei_micro_batch_size", saei_micro_batch_size=0
    ),
    # Whole groups per process: 6 rows are not a multiple of 4 generations.
    "saei-config/partial-groups": _saei_config(
        ValueError, "num_generations", per_device_train_batch_size=6, gradient_accumulation_steps=1
    ),
}

CASES = table(ATTACK_ENTRY, dispatches=False)
SAEI_CASES = table(SAEI_ENTRY, dispatches=False)
