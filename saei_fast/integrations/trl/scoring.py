"""After generation in the TRL integration: the adversarial rows' vLLM importance-sampling
correction and the clean / adversarial reward metrics, on top of TRL's scoring."""

from __future__ import annotations

import torch


class SaEIScoring:
    """The scoring hooks of :class:`~saei_fast.integrations.trl.trainer.SaEIGRPOTrainer`.

    A mixin placed before ``GRPOTrainer`` in the trainer's bases, so ``super()`` here is
    TRL's ``GRPOTrainer``; it reads ``_saei_last_adversarial`` (the rows' arm, set by
    generation) and logs through the trainer's ``_saei_log``.
    """

    # ---- after generation: importance sampling, rewards ----------------------------------

    def _generate_and_score_completions(self, inputs):
        """TRL's scoring, then the explicit treatment of the adversarial rows' vLLM
        importance-sampling correction.

        The correction (``vllm_importance_sampling_correction``) reweights each token by
        ``p_trainer / p_vllm`` to undo the numerical mismatch of the two engines. For an
        adversarial row the trainer's log-prob is on the clean image (as the whole update
        is) while vLLM sampled it from the adversarial one, so that ratio measures the
        image change, and in ``*_mask`` modes would drop the row. SaEI trains on these rows
        as samples for the clean-image policy (as the paper does), so their ratio is set to
        1 and their sampling log-probs to the clean-image ones (which also keeps the
        off-policy sequence mask from dropping them for the image change). What the ratio
        would have been is logged: ``saei/adv_sampling_logp_shift`` (mean over tokens of
        ``log p_sampling - log p_clean``) and ``saei/adv_is_dropped_fraction``. TRL's own
        ``sampling/*`` metrics are logged inside TRL's scoring, before this correction.

        The batch also carries ``saei_is_adversarial`` (bool ``[B]``), which TRL shuffles
        with the other per-row tensors, so the loss can log clean and adversarial rows apart.
        """
        output = super()._generate_and_score_completions(inputs)
        adversarial = self._saei_last_adversarial
        if adversarial is None:
            return output
        adversarial = adversarial.to(output["completion_mask"].device)
        output["saei_is_adversarial"] = adversarial
        if "importance_sampling_ratio" not in output:
            return output
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask &= output["tool_mask"].bool()
        adv_tokens = mask & adversarial[:, None]
        sampling = output["sampling_per_token_logps"]
        old = output["old_per_token_logps"]
        shift = torch.nan_to_num(sampling - old, nan=0.0)[adv_tokens]
        ratio = output["importance_sampling_ratio"]
        dropped = (ratio == 0).expand_as(mask)[adv_tokens]
        self._saei_log("adv_sampling_logp_shift", _mean(shift))
        self._saei_log("adv_is_dropped_fraction", _mean(dropped.float()))

        ratio = ratio.clone()
        ratio[adversarial] = 1.0
        output["importance_sampling_ratio"] = ratio
        sampling = sampling.clone()
        sampling[adversarial] = old[adversarial]
        output["sampling_per_token_logps"] = sampling
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        adversarial = self._saei_last_adversarial
        if adversarial is None:
            return rewards_per_func
        # Rewards are gathered from every process; each holds whole groups, same layout.
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        adversarial = adversarial.to(rewards.device).repeat(rewards.numel() // adversarial.numel())
        self._metrics["train"]["saei/reward_clean"].append(rewards[~adversarial].mean().item())
        self._metrics["train"]["saei/reward_adv"].append(rewards[adversarial].mean().item())
        return rewards_per_func


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0
