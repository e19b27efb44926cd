"""The catalogue of SaEIGRPOTrainer settings: every ``saei_*`` field of ``SaEIConfig`` and
every TRL setting the trainer refuses, each with a rejected value (the error type and a
message naming the setting) and an accepted one, on both sides of every numeric boundary.

``test_every_saei_field_is_catalogued`` fails when a field is added without entries.
FSDP and DeepSpeed, which depend on accelerate's state rather than on a setting, are in
tests/test_trl_parallel.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
from trl import GRPOConfig
from trl_helpers import Rewards, make_config

from saei_fast.integrations.trl import SaEIConfig, SaEIGRPOTrainer
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

# The smallest temperature whose inverse is finite in float32 is 1 / float32 max = 2.94e-39.
TINY_T_OK, TINY_T_BAD = 3e-39, 2.9e-39

# (settings, None if accepted else (error type, message pattern)); make_config's group is
# num_generations=4 with 8 rows per process.
CONFIG = {
    "enabled-str": ({"saei_enabled": "yes"}, (TypeError, "saei_enabled must be a bool")),
    "enabled-false": ({"saei_enabled": False}, None),
    "n-clean-0": ({"saei_n_clean": 0, "saei_n_adv": 4}, (ValueError, "saei_n_clean must be >= 1")),
    "n-clean-1": ({"saei_n_clean": 1, "saei_n_adv": 3}, None),
    "n-clean-float": ({"saei_n_clean": 2.0}, (TypeError, "saei_n_clean must be an int")),
    "n-clean-unset": ({"saei_n_clean": None, "saei_n_adv": 3}, None),
    "n-adv-0": ({"saei_n_clean": 4, "saei_n_adv": None}, (ValueError, "saei_n_adv must be >= 1")),
    "n-adv-1": ({"saei_n_clean": 3, "saei_n_adv": 1}, None),
    "n-adv-bool": ({"saei_n_clean": None, "saei_n_adv": True}, (TypeError, "saei_n_adv must be")),
    "split-over-group": (
        {"saei_n_clean": 3, "saei_n_adv": 2},
        (ValueError, r"saei_n_clean \+ saei_n_adv must equal num_generations \(4\)"),
    ),
    "split-under-group": (
        {"saei_n_clean": 2, "saei_n_adv": 1},
        (ValueError, r"saei_n_clean \+ saei_n_adv must equal"),
    ),
    "alpha-0": ({"saei_alpha": 0.0}, (ValueError, "saei_alpha must be finite and > 0")),
    "alpha-tiny": ({"saei_alpha": 1e-12}, None),
    "alpha-negative": ({"saei_alpha": -2 / 255}, (ValueError, "saei_alpha must be finite")),
    "alpha-inf": ({"saei_alpha": math.inf}, (ValueError, "saei_alpha must be finite")),
    "alpha-str": ({"saei_alpha": "2/255"}, (TypeError, "saei_alpha must be a float")),
    "steps-0": ({"saei_steps": 0}, (ValueError, "saei_steps must be >= 1")),
    "steps-1": ({"saei_steps": 1}, None),
    "steps-float": ({"saei_steps": 1.5}, (TypeError, "saei_steps must be an int")),
    "eps-0": ({"saei_eps": 0.0}, (ValueError, "saei_eps must be finite and > 0")),
    "eps-tiny": ({"saei_eps": 1e-12}, None),
    "eps-unset": ({"saei_eps": None}, None),
    "eps-nan": ({"saei_eps": math.nan}, (ValueError, "saei_eps must be finite")),
    "band-full": ({"saei_band": [0.0, 1.0]}, None),
    "band-below-0": ({"saei_band": [-1e-9, 0.5]}, (ValueError, "saei_band must satisfy 0 <= lo")),
    "band-above-1": ({"saei_band": [0.5, 1.0 + 1e-9]}, (ValueError, "saei_band must satisfy")),
    "band-empty": ({"saei_band": [0.5, 0.5]}, (ValueError, "saei_band must satisfy 0 <= lo < hi")),
    "band-narrow": ({"saei_band": [0.5, 0.5 + 1e-9]}, None),
    "band-three": ({"saei_band": [0.1, 0.2, 0.3]}, (TypeError, "saei_band must be a pair")),
    "band-str": ({"saei_band": ["0", "1"]}, (TypeError, "saei_band must hold two floats")),
    "scope-unknown": ({"saei_scope": "token"}, (ValueError, "saei_scope must be one of")),
    **{f"scope-{scope}": ({"saei_scope": scope}, None) for scope in ("sequence", "group", "batch")},
    "micro-batch-0": ({"saei_micro_batch_size": 0}, (ValueError, "saei_micro_batch_size must be")),
    "micro-batch-1": ({"saei_micro_batch_size": 1}, None),
    "micro-batch-float": ({"saei_micro_batch_size": 2.5}, (TypeError, "saei_micro_batch_size")),
    "perturbation-gaussian": (
        {"saei_perturbation": "gaussian"},
        (ValueError, "saei_perturbation must be one of"),
    ),
    "perturbation-random": ({"saei_perturbation": "random"}, None),
    "fused-head-int": ({"saei_fused_head": 1}, (TypeError, "saei_fused_head must be a bool")),
    **{f"fused-head-{value}": ({"saei_fused_head": value}, None) for value in (None, True, False)},
    "fused-loss-str": ({"saei_fused_loss": "yes"}, (TypeError, "saei_fused_loss must be a bool")),
    "fused-loss-true": ({"saei_fused_loss": True}, None),
    # TRL's settings that SaEIConfig checks (TRL itself would accept them and fail later).
    "temperature-0": ({"temperature": 0.0}, (ValueError, "temperature must be finite and > 0")),
    "temperature-below-min": ({"temperature": TINY_T_BAD}, (ValueError, "1/temperature")),
    "temperature-min": ({"temperature": TINY_T_OK}, None),
    "temperature-inf": ({"temperature": math.inf}, (ValueError, "temperature must be finite")),
    "temperature-disabled-nan": (
        {"temperature": math.nan, "saei_enabled": False},
        (ValueError, "temperature must be finite"),
    ),
    "generation-temperature-0": (
        {"generation_kwargs": {"temperature": 0}},
        (ValueError, r"generation_kwargs\['temperature'\]: temperature must"),
    ),
    "generation-temperature-str": (
        {"generation_kwargs": {"temperature": "hot"}},
        (TypeError, r"generation_kwargs\['temperature'\]"),
    ),
    "generation-temperature-min": ({"generation_kwargs": {"temperature": TINY_T_OK}}, None),
    # Whole groups per process. In one process TRL's own check (on the generation batch)
    # comes first; SaEI's per-process one is check_whole_groups_per_process, tested with
    # several processes' numbers in test_trl_integration.py.
    "rows-not-whole-groups": (
        {"per_device_train_batch_size": 6},
        (ValueError, r"generation_batch_size \(6\) must be divisible by num_generations"),
    ),
    "rows-whole-groups": ({"per_device_train_batch_size": 4}, None),
    "continuous-batching": (
        {"use_transformers_continuous_batching": True},
        (ValueError, "does not support use_transformers_continuous_batching"),
    ),
    "continuous-batching-disabled": (
        {"use_transformers_continuous_batching": True, "saei_enabled": False},
        None,
    ),
}


@pytest.mark.parametrize("name", list(CONFIG))
def test_config_catalogue(tmp_path, name):
    settings, error = CONFIG[name]
    if error is None:
        config = make_config(tmp_path, **settings)
        if config.saei_enabled:
            config.attack_config()  # what the trainer builds from it
        return
    with pytest.raises(error[0], match=error[1]):
        make_config(tmp_path, **settings)


def test_every_saei_field_is_catalogued():
    fields = {f.name for f in dataclasses.fields(SaEIConfig) if f.name.startswith("saei_")}
    rejected = {key for settings, error in CONFIG.values() if error for key in settings}
    accepted = {key for settings, error in CONFIG.values() if not error for key in settings}
    assert fields <= rejected, sorted(fields - rejected)
    assert fields <= accepted, sorted(fields - accepted)


# ---- what the trainer refuses at construction -------------------------------------------------

# (config settings, trainer arguments, error pattern or None): TRL's settings the fused loss
# does not reproduce, and the trainer arguments SaEI cannot sample with (a ValueError; a
# TypeError for args that are not a SaEIConfig). The fused loss's refusal of a MoE router's
# auxiliary loss needs a MoE model and is not in this table.
TRAINER = {
    "fused-loss-sapo": ({"saei_fused_loss": True, "loss_type": "sapo"}, {}, "loss_type='sapo'"),
    "fused-loss-sequence-level": (
        {"saei_fused_loss": True, "importance_sampling_level": "sequence"},
        {},
        "couples the tokens of a sequence",
    ),
    "fused-loss-top-entropy-below-1": (
        {"saei_fused_loss": True, "top_entropy_quantile": 0.99},
        {},
        "top_entropy_quantile < 1",
    ),
    "fused-loss-top-entropy-1": ({"saei_fused_loss": True, "top_entropy_quantile": 1.0}, {}, None),
    "fused-loss-off-policy-mask": (
        {"saei_fused_loss": True, "off_policy_mask_threshold": 0.5},
        {},
        "off_policy_mask_threshold",
    ),
    "fused-loss-adaptive-entropy": (
        {"saei_fused_loss": True, "use_adaptive_entropy": True, "entropy_coef": 0.01},
        {},
        "use_adaptive_entropy",
    ),
    "rollout-func": ({}, {"rollout_func": lambda prompts, trainer: {}}, "rollout_func"),
    "environment-factory": ({}, {"environment_factory": object}, "environment_factory"),
    "tools": ({}, {"tools": [len]}, "does not support tools"),
    "text-only": ({}, {"processing_class": "tokenizer"}, "needs a vision-language model"),
    "text-only-disabled": ({"saei_enabled": False}, {"processing_class": "tokenizer"}, None),
    "tiling-with-vllm": ({"use_vllm": True}, {"processing_class": "tiling"}, "tile images"),
    "args-plain-grpo-config": ({}, {"args": "GRPOConfig"}, "args must be a saei_fast"),
}


@pytest.mark.parametrize("name", list(TRAINER))
def test_trainer_catalogue(processor, examples, tmp_path, name):
    settings, arguments, error = TRAINER[name]
    config = make_config(tmp_path, **{k: v for k, v in settings.items() if k != "use_vllm"})
    # TRL needs vLLM installed to get past use_vllm=True; SaEI's check comes first.
    config.use_vllm = settings.get("use_vllm", False)
    processing_class = processor
    if arguments.get("processing_class") == "tokenizer":
        processing_class = processor.tokenizer
    elif arguments.get("processing_class") == "tiling":
        processing_class = copy.deepcopy(processor)
        processing_class.image_processor.do_image_splitting = True  # Idefics3 / SmolVLM
    extra = {k: v for k, v in arguments.items() if k not in ("processing_class", "args")}
    if arguments.get("args") == "GRPOConfig":  # TRL's own config, without the saei_* fields
        config = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")

    def build():
        return SaEIGRPOTrainer(
            model=demo_model(processor, hidden_size=32, seed=0),
            reward_funcs=Rewards(),
            args=config,
            train_dataset=to_dataset(examples),
            processing_class=processing_class,
            **extra,
        )

    if error is None:
        build()
        return
    with pytest.raises(TypeError if "args" in arguments else ValueError, match=error):
        build()
