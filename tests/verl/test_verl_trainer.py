"""The SaEI trainer against verl's own ``PPOTrainerSync``, built from verl's default trainer
config on the CPU.

verl's ``fit`` needs rollout servers (vLLM/SGLang), TransferQueue and GPU engines, so the
trainer loop itself is not driven here (``bench/gpu_verl_check.sh`` runs two steps on a
GPU); instead every method the SaEI trainer changes is compared with verl's: construction
(the mode verl's code branches on, its replay buffer), ``_init_resource_pool_mgr`` and the
step ``_setup`` adds. ``_setup`` itself creates Ray worker groups on GPUs; its verl part is
replaced by a stand-in that only provides the actor worker group's names.
"""

import pytest
from omegaconf import OmegaConf
from test_verl_refusals import verl_saei_config
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from saei_fast.integrations.verl import plugin
from saei_fast.integrations.verl.trainer import SaEITrainer
from saei_fast.integrations.verl.worker import SaEIActorRolloutRefWorker


def _trainers(**overrides):
    saei = verl_saei_config(**{"trainer.v1.trainer_mode": "saei_sync", **overrides})
    verl_own = verl_saei_config(**{"trainer.v1.trainer_mode": "sync", **overrides})
    return SaEITrainer(saei), PPOTrainerSync(verl_own)


def _replay_state(trainer) -> dict:
    return {
        key: value
        for key, value in vars(trainer.replay_buffer).items()
        if not callable(value) and "lock" not in key and "cond" not in key
    }


def test_registered_beside_verls_sync_trainer():
    assert get_trainer_cls("saei_sync") is SaEITrainer
    assert get_trainer_cls("sync") is PPOTrainerSync  # verl's own entry untouched
    assert issubclass(SaEITrainer, PPOTrainerSync)


def test_verl_sees_its_own_sync_mode():
    saei, verl_own = _trainers()
    assert saei.trainer_mode == verl_own.trainer_mode == "sync"
    assert saei.config.trainer.v1.trainer_mode == "sync"
    assert type(saei.replay_buffer) is type(verl_own.replay_buffer) is ReplayBuffer
    assert _replay_state(saei) == _replay_state(verl_own)
    assert saei.parameter_sync_step == verl_own.parameter_sync_step


def test_the_mode_string_alone_would_not_be_sync():
    """What the normalisation prevents: verl's trainer under the mode string ``saei_sync``
    takes its asynchronous replay buffer (the bug this trainer used to have)."""
    config = verl_saei_config(**{"trainer.v1.trainer_mode": "saei_sync"})
    trainer = PPOTrainerSync(config)
    assert type(trainer.replay_buffer) is not ReplayBuffer


def test_resource_pools_are_verls_with_the_saei_actor():
    saei, verl_own = _trainers()
    saei._init_resource_pool_mgr()
    verl_own._init_resource_pool_mgr()
    assert saei.mapping == verl_own.mapping
    assert set(saei.role_worker_mapping) == set(verl_own.role_worker_mapping)
    actor = saei.saei_actor_role
    assert actor in (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor)
    assert _worker_class(saei.role_worker_mapping[actor]) is SaEIActorRolloutRefWorker
    for role, worker in verl_own.role_worker_mapping.items():
        if role != actor:
            assert _worker_class(saei.role_worker_mapping[role]) is _worker_class(worker)
    assert (
        saei.resource_pool_manager.resource_pool_spec
        == verl_own.resource_pool_manager.resource_pool_spec
    )


def _worker_class(actor_class) -> type:
    """The worker class a Ray actor class wraps (Ray subclasses it once per ``ray.remote``)."""
    return actor_class.__ray_metadata__.modified_class.__mro__[1]


class _WorkerGroup:
    worker_names = ("abc_WorkerDict_0:0", "abc_WorkerDict_0:1")


def test_setup_publishes_the_actor_workers_for_the_agent_loops(monkeypatch):
    saei, _ = _trainers()
    saei._init_resource_pool_mgr()

    def verl_setup(self):
        self.actor_rollout_wg = _WorkerGroup()

    monkeypatch.setattr(PPOTrainerSync, "_setup", verl_setup)
    saei._setup()
    runtime = OmegaConf.to_container(saei.config.saei._runtime)
    assert runtime == {"worker_names": list(_WorkerGroup.worker_names), "role": "actor_rollout"}


def test_start_up_refusals():
    with pytest.raises(ValueError, match="bypass_mode"):
        _trainers(**{"algorithm.rollout_correction.bypass_mode": True})
    with pytest.raises(ValueError, match="trainer_mode must be 'saei_sync'"):
        SaEITrainer(verl_saei_config(**{"trainer.v1.trainer_mode": "separate_async"}))
    plugin.REGISTRATION_ERRORS.append("broken")
    try:
        with pytest.raises(RuntimeError, match="failed to register: broken"):
            SaEITrainer(verl_saei_config(**{"trainer.v1.trainer_mode": "saei_sync"}))
    finally:
        plugin.REGISTRATION_ERRORS.remove("broken")
