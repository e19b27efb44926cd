"""SaEIGRPOTrainer under FSDP and DeepSpeed: what is refused at construction, read from
accelerate's state (``saei_fast.integrations.trl.parallel``).

Neither runs on this machine (accelerate makes FSDP only on accelerators, and DeepSpeed is
not installed), so the states are built from accelerate's real plugin classes
(``FullyShardedDataParallelPlugin``, ``DeepSpeedPlugin``, which need neither) in a stand-in
for ``AcceleratorState``, and the trainer is shown that state in place of its own.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from trl_helpers import Rewards, make_config

import saei_fast.integrations.trl.trainer as integration
from saei_fast.integrations.trl import SaEIGRPOTrainer
from saei_fast.integrations.trl.parallel import parallel_setup
from saei_fast.tools.demo.model import demo_model
from saei_fast.tools.demo.task import to_dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def fsdp(version: int) -> SimpleNamespace:
    return SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=version),
    )


def deepspeed(stage: int) -> SimpleNamespace:
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": stage}}),
    )


STATES = {
    "FSDP1": fsdp(1),
    "FSDP2": fsdp(2),
    **{f"DeepSpeed ZeRO-{stage}": deepspeed(stage) for stage in range(4)},
}


@pytest.mark.parametrize("name", list(STATES))
def test_the_setup_is_read_from_accelerates_plugins(name):
    assert parallel_setup(STATES[name]) == name


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.MULTI_CPU, "MULTI_GPU"])
def test_one_process_and_ddp_are_no_special_setup(kind):
    assert parallel_setup(SimpleNamespace(distributed_type=DistributedType(kind))) is None


def test_a_model_sharded_before_the_trainer_is_fsdp2(processor, examples, tmp_path):
    """torch's ``fully_shard`` swaps the module's class for a subclass of ``FSDPModule``
    (it needs a process group and a device mesh, so the swap is made by hand here). The
    trainer refuses such a model before TRL's constructor uses it."""
    model = demo_model(processor, hidden_size=32, seed=0)
    assert parallel_setup(SimpleNamespace(distributed_type=DistributedType.NO), model) is None
    layer = model.model.language_model.layers[0]
    layer.__class__ = type(f"FSDP{type(layer).__name__}", (FSDPModule, type(layer)), {})
    assert parallel_setup(SimpleNamespace(distributed_type=DistributedType.NO), model) == "FSDP2"
    with pytest.raises(ValueError, match="saei_enabled=True is not supported with FSDP2"):
        SaEIGRPOTrainer(
            model=model,
            reward_funcs=Rewards(),
            args=make_config(tmp_path),
            train_dataset=to_dataset(examples),
            processing_class=processor,
        )


def build(processor, examples, tmp_path, monkeypatch, setup: str, **settings):
    """The trainer, constructed with accelerate's state replaced by ``STATES[setup]``."""
    monkeypatch.setattr(
        integration,
        "parallel_setup",
        lambda state, _model: parallel_setup(STATES[setup]) if state is not None else None,
    )
    return SaEIGRPOTrainer(
        model=demo_model(processor, hidden_size=32, seed=0),
        reward_funcs=Rewards(),
        args=make_config(tmp_path, **settings),
        train_dataset=to_dataset(examples),
        processing_class=processor,
    )


# (setup, settings, the error's text or None where the trainer is built)
REFUSALS = [
    *[
        (setup, {}, f"saei_enabled=True is not supported with {setup}: .*sharded")
        for setup in ("FSDP1", "FSDP2", "DeepSpeed ZeRO-3")
    ],
    *[
        (setup, {"saei_enabled": False, key: True}, f"{key}=True is not supported here: .*{setup}")
        for setup in ("FSDP2", "DeepSpeed ZeRO-2")
        for key in ("saei_fused_head", "saei_fused_loss")
    ],
    ("DeepSpeed ZeRO-2", {}, None),  # SaEI sampling with whole parameters; fused head off
    ("FSDP2", {"saei_enabled": False}, None),  # vanilla GRPO with TRL's head
]


@pytest.mark.parametrize(("setup", "settings", "error"), REFUSALS)
def test_sharded_setups_are_refused_at_construction(
    processor, examples, tmp_path, monkeypatch, setup, settings, error
):
    if error is not None:
        with pytest.raises(ValueError, match=error):
            build(processor, examples, tmp_path, monkeypatch, setup, **settings)
        return
    trainer = build(processor, examples, tmp_path, monkeypatch, setup, **settings)
    # saei_fused_head=None would be on for CPU training; under these setups it is off.
    assert trainer._saei_setup == setup and trainer._saei_fused_head is False
