"""SaEI as a verl plugin (verl >= 0.9.1, < 0.10), no fork: ``pip install 'saei-fast[verl]'``.

verl loads :mod:`saei_fast.integrations.verl.plugin` through the ``verl.plugins`` entry point
at ``import verl``; it registers, lazily:

- the agent loop ``saei_agent`` (:mod:`.agent_loop`): clean rows, the adversarial image from
  the actor, adversarial rows, all under the prompt's uid, the clean image returned for the
  update;
- the trainer ``saei_sync`` (:mod:`.trainer`): verl's sync trainer (verl's code sees
  ``trainer_mode == "sync"``) with the actor worker whose ``saei_attack`` method runs the
  attack on the engine's model (:mod:`.worker`, :mod:`.engine_model`), reached from the agent
  loops through :mod:`.client`; the step's ``saei/`` metrics (:mod:`.metrics`).

A run enables SaEI with config keys only::

    trainer.v1.trainer_mode=saei_sync
    actor_rollout_ref.rollout.agent.default_agent_loop=saei_agent
    actor_rollout_ref.rollout.n=12
    +saei.n_clean=6 +saei.n_adv=6 +saei.alpha=0.00784313725

See ``examples/verl/qwen2_5_vl_7b_geo3k_saei.sh``. Importing this package imports no verl.
"""

from saei_fast.integrations.verl.config import (
    AGENT_LOOP_NAME,
    TRAINER_NAME,
    SaEISettings,
    settings_from_trainer_config,
)

__all__ = ["AGENT_LOOP_NAME", "TRAINER_NAME", "SaEISettings", "settings_from_trainer_config"]
