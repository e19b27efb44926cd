"""The SaEI trainer: verl's synchronous v1 trainer with the SaEI actor worker installed.

verl picks its trainer class by ``trainer.v1.trainer_mode`` in its registry
(``verl.trainer.ppo.v1.trainer_base.TRAINER_REGISTRY``, filled with ``register_trainer``);
the plugin registers this class there as ``saei_sync``. verl's own code then branches on the
mode string, testing ``trainer_mode == "sync"`` literally (replay buffer, data-loader refill,
checkpoints, TransferQueue state), so the class puts ``"sync"`` back into
``config.trainer.v1.trainer_mode`` before verl reads it: from construction on, verl sees its
own ``sync`` mode and every one of those branches takes the sync path, exactly as for
``PPOTrainerSync``. ``saei_sync`` only selects the class.

It differs from ``PPOTrainerSync`` in four places:

- start-up: the ``saei`` block is validated against the whole config
  (:func:`saei_fast.integrations.verl.config.settings_from_trainer_config`), and a plugin
  registration failure stops the run;
- ``_init_resource_pool_mgr``: the actor role's worker class becomes
  :class:`~saei_fast.integrations.verl.worker.SaEIActorRolloutRefWorker` (verl's own
  ``PPOTrainerSeparateAsync`` swaps its worker the same way);
- ``_setup``: after the worker groups exist, the actor workers' Ray names go to
  ``config.saei._runtime``; verl hands this config to the agent-loop workers it creates next,
  where :mod:`saei_fast.integrations.verl.client` re-attaches to them;
- ``_compute_metrics``: verl's metrics, plus the step's ``saei/`` metrics
  (:mod:`saei_fast.integrations.verl.metrics`).

Everything else (rewards, GRPO advantages over each uid, old/ref log-probs and the update on
the clean images, weight sync) is verl's.
"""

from __future__ import annotations

import ray
import transfer_queue as tq
from omegaconf import open_dict
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1 import trainer_base
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from saei_fast.integrations.verl.config import TRAINER_NAME, settings_from_trainer_config
from saei_fast.integrations.verl.metrics import step_metrics
from saei_fast.integrations.verl.registration import REGISTRATION_ERRORS
from saei_fast.integrations.verl.worker import SaEIActorRolloutRefWorker

SYNC_MODE = "sync"  # the mode string verl's code tests for its synchronous trainer
_ACTOR_ROLES = (Role.Actor, Role.ActorRolloutRef, Role.ActorRollout)


class SaEITrainer(PPOTrainerSync):
    """verl's ``sync`` trainer sampling SaEI groups (see the module docstring)."""

    def __init__(self, config) -> None:
        if REGISTRATION_ERRORS:
            raise RuntimeError(
                "saei-fast's verl plugin failed to register: " + "; ".join(REGISTRATION_ERRORS)
            )
        self.saei_settings = settings_from_trainer_config(config)
        mode = config.trainer.v1.trainer_mode
        if mode not in (TRAINER_NAME, SYNC_MODE):
            raise ValueError(
                f"trainer.v1.trainer_mode must be {TRAINER_NAME!r} to run SaEI (verl's sync "
                f"trainer with the SaEI actor), got {mode!r}"
            )
        with open_dict(config):
            config.trainer.v1.trainer_mode = SYNC_MODE
        super().__init__(config)

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        for role in _ACTOR_ROLES:
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(SaEIActorRolloutRefWorker)
                self.saei_actor_role = role
                return
        raise RuntimeError(f"no actor role among {sorted(map(str, self.role_worker_mapping))}")

    def _setup(self) -> None:
        super()._setup()
        self._publish_actor_workers()

    def _publish_actor_workers(self) -> None:
        """The actor workers' Ray names and role, for the agent-loop processes."""
        with open_dict(self.config):
            self.config.saei._runtime = {
                "worker_names": list(self.actor_rollout_wg.worker_names),
                "role": str(self.saei_actor_role),
            }

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        """verl's metrics, then the step's ``saei/`` metrics from the rows' extra fields and
        rewards (read from TransferQueue as verl's own ``_compute_metrics`` reads them)."""
        result = super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        metrics.update(saei_metrics_of(batch))
        return result


def saei_metrics_of(batch) -> dict[str, float]:
    """``saei/`` metrics of the rows of ``batch`` (a ``KVBatchMeta``), padding rows left out."""
    data = tq.kv_batch_get(
        keys=batch.keys,
        partition_id=batch.partition_id,
        select_fields=["extra_fields", "rm_scores"],
    )
    extra_fields = data.pop("extra_fields").tolist()
    rewards = data.to_padded_tensor()["rm_scores"].sum(-1).tolist()
    real = [not tag.get("is_padding", False) for tag in batch.tags]
    return step_metrics(
        [fields for fields, keep in zip(extra_fields, real, strict=True) if keep],
        [reward for reward, keep in zip(rewards, real, strict=True) if keep],
    )


def register(registry=trainer_base) -> None:
    """Register :class:`SaEITrainer` as ``saei_sync`` in verl's trainer registry (once)."""
    if registry.TRAINER_REGISTRY.get(TRAINER_NAME) is not SaEITrainer:
        registry.register_trainer(TRAINER_NAME)(SaEITrainer)


register()
