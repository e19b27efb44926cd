"""The loss forward of the TRL integration: saei-fast's fused head and fused loss in place
of TRL's head when enabled, and the clean / adversarial split of the loss's entropy."""

from __future__ import annotations

import torch

from saei_fast.integrations.shared.fused_head import (
    FusedHead,
    fused_head_for,
    unsupported_reason,
)
from saei_fast.integrations.shared.fused_loss import GRPOTokenLoss


class SaEILoss:
    """The loss hooks of :class:`~saei_fast.integrations.trl.trainer.SaEIGRPOTrainer`.

    A mixin placed before ``GRPOTrainer`` in the trainer's bases, so ``super()`` here is
    TRL's ``GRPOTrainer``; it uses the trainer's ``_saei_fused_head``, ``_saei_fused_loss``,
    ``_saei_pending_loss`` and ``_saei_loss_rows``, set in its ``__init__``.
    """

    # ---- the loss forward ----------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        adversarial = inputs.get("saei_is_adversarial")
        if adversarial is not None:
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
            self._saei_loss_rows = (adversarial, mask.bool())
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._saei_loss_rows = None

    def _compute_loss(self, model, inputs):
        """TRL's, with the gradient taken by the fused loss when ``saei_fused_loss`` is on and
        a backward follows (TRL's value and metrics, the fused loss's gradient)."""
        if not (self._saei_fused_loss and torch.is_grad_enabled()):
            return super()._compute_loss(model, inputs)
        pending = GRPOTokenLoss(self, inputs, training=self.model.training)
        self._saei_pending_loss = pending
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._saei_pending_loss = None
        return pending.combine(loss)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        """TRL's, with saei-fast's fused head in place of TRL's when ``saei_fused_head`` is
        on (and with the fused loss in the training-loss forward), and the clean /
        adversarial split of the loss forward's entropy logged."""
        pending, self._saei_pending_loss = self._saei_pending_loss, None  # its first call only
        # Unwrapped or DDP-wrapped (the call then goes through DDP's forward, for its
        # gradient hooks); any other wrapper runs TRL's head (FSDP and DeepSpeed with the
        # fused paths are refused at construction).
        target = None
        if self._saei_fused_head or pending is not None:
            target = fused_head_for(model, self.accelerator.unwrap_model(model))
        if target is not None and unsupported_reason(target[0]) is None:
            module, wrapper = target
            model = FusedHead(module, temperature=self.temperature, loss=pending, wrapper=wrapper)
        logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, *args, **kwargs
        )
        if entropies is not None and self._saei_loss_rows is not None:
            self._saei_log_entropy_split(entropies.detach(), *self._saei_loss_rows)
        return logps, entropies, aux_loss

    def _saei_log_entropy_split(
        self, entropies: torch.Tensor, adversarial: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Token-weighted mean entropy of the clean and of the adversarial rows, over all
        processes (as TRL's ``entropy``: their token-weighted mean is TRL's value)."""
        adversarial = adversarial.to(entropies.device)[:, None]
        clean_tokens, adv_tokens = mask & ~adversarial, mask & adversarial
        stats = torch.stack(
            [
                (entropies * clean_tokens).sum(),
                clean_tokens.sum().to(entropies.dtype),
                (entropies * adv_tokens).sum(),
                adv_tokens.sum().to(entropies.dtype),
            ]
        ).float()
        stats = self.accelerator.reduce(stats, reduction="sum").tolist()
        for name, total, count in (("clean", *stats[:2]), ("adv", *stats[2:])):
            if count > 0:
                self._metrics["train"][f"saei/entropy_{name}_rows"].append(total / count)
