"""SaEI as a drop-in for TRL's ``GRPOTrainer``: :class:`SaEIConfig` and :class:`SaEIGRPOTrainer`.

    from saei_fast.integrations.trl import SaEIConfig, SaEIGRPOTrainer

    args = SaEIConfig(output_dir="out", num_generations=12, saei_n_clean=6, saei_n_adv=6)
    trainer = SaEIGRPOTrainer(model=model, processing_class=processor, reward_funcs=reward,
                              args=args, train_dataset=dataset)   # rows with an "image" column
    trainer.train()

With ``saei_enabled=False`` the same script trains vanilla GRPO. With SaEI on, every group of
``num_generations`` rows of a training batch is sampled as SaEI prescribes:

1. rows ``0 .. n_clean - 1`` of the group from the clean image;
2. :func:`saei_fast.entropy_attack` on those responses (band-selected entropy, one signed
   step on the image, shared by the group);
3. rows ``n_clean ..`` from the adversarial image.

Everything after generation is TRL's own: rewards, GRPO advantages over the whole group,
and the old / reference / policy log-probs, which TRL computes from the dataset's (clean)
images for every row. Only the generation hook (``_generate_single_turn``) is replaced, and
two others are extended: reward logging (clean vs adversarial rows) and the vLLM
importance-sampling ratio, which must not treat the adversarial rows as engine mismatch
(see :meth:`SaEIGRPOTrainer._generate_and_score_completions`).

``saei_perturbation="random"`` runs the control arm: the same grouping, with a random-sign
step of the same size instead of the attack's (NoisyRollout-style sampling; the signs are
drawn from a generator seeded by ``seed``, the global step and the process index).

Evaluation generates from clean images only. Supported: TRL 1.16.x with Hugging Face
``generate``, or with vLLM in colocate or server mode: the clean rows and the adversarial
rows are generated in two calls of ``n_clean`` and ``n_adv`` identical rows per prompt, so
the server's deduplication (one image per run of ``num_generations`` rows) sees the right
image for each. The vLLM path is tested against a stand-in backend with the server's
contract (vLLM itself is not part of the test environment). Tools, environments, a custom
``rollout_func`` and continuous batching are refused.

With vLLM, every generation (both arms) checks that the prompt the engine reports has as
many tokens as the trainer's prompt row, and raises a ``RuntimeError`` naming TRL issues
6294 / 6401 when it does not: TRL 1.16 in colocate mode sends vLLM processor-expanded image
tokens, which vLLM expands again (see :mod:`.vllm_prompts`).

The package's modules: :mod:`.config` (:class:`SaEIConfig` and its checks), :mod:`.trainer`
(:class:`SaEIGRPOTrainer`: construction, refusals, ``saei/`` metric logging), and the
trainer's hooks by job: :mod:`.sampling` (generation), :mod:`.scoring` (rewards and the vLLM
importance-sampling correction), :mod:`.loss` (the loss forward, fused head and loss);
:mod:`.parallel` (which distributed setups run) and :mod:`.vllm_prompts` (the vLLM prompt
check). What it shares with the verl integration is in :mod:`saei_fast.integrations.shared`.
"""

from saei_fast.integrations.trl.config import SaEIConfig, check_whole_groups_per_process

# SUPPORTED_TRL stays reachable under the package's name, outside __all__ as before the split.
from saei_fast.integrations.trl.trainer import SUPPORTED_TRL, SaEIGRPOTrainer  # noqa: F401

__all__ = ["SaEIConfig", "SaEIGRPOTrainer", "check_whole_groups_per_process"]
