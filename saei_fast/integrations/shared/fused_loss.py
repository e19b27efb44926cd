"""saei-fast's fused loss for TRL's GRPO loss (``SaEIConfig(saei_fused_loss=True)``): the
gradient of TRL's token-level policy loss taken by :func:`saei_fast.linear_token_loss`
while each chunk's logits are in memory (3 GEMMs per completion token at any batch size,
where the per-token head keeps one chunk of logits and recomputes the rest).

TRL 1.16 computes the loss in ``GRPOTrainer._compute_loss`` from per-token log-probs and
entropies. With the fused loss, TRL's code still runs unchanged and still produces the loss
value and every logged metric, from the same log-probs and entropies; only the gradient
comes from here. For that, :class:`GRPOTokenLoss` writes TRL's loss for the supported
configurations as a sum of per-token terms (clipped ratio, KL, importance-sampling
correction, the loss type's normalisation, the entropy bonus), which the fused head hands
to ``linear_token_loss``. The two values are compared on every call: a configuration or a
TRL version whose loss this does not reproduce raises instead of training on a wrong
gradient.
"""

from __future__ import annotations

import abc

import torch

from saei_fast.ops import linear_token_loss

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def unsupported_reason(trainer) -> str | None:
    """Why TRL's loss with ``trainer``'s settings is not a sum of per-token terms that
    :class:`GRPOTokenLoss` reproduces (None: it is)."""
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})"
    if trainer.importance_sampling_level != "token":
        return "importance_sampling_level='sequence' couples the tokens of a sequence"
    if trainer.top_entropy_quantile < 1.0:
        return "top_entropy_quantile < 1 selects tokens by a quantile over the batch"
    if trainer.off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold masks sequences by their mean log-ratio"
    if trainer.use_adaptive_entropy:
        return "use_adaptive_entropy changes the entropy coefficient between micro-batches"
    if trainer.aux_loss_enabled:
        return "the MoE router's auxiliary loss needs TRL's head"
    return None


class FusedTokenLoss(abc.ABC):
    """A per-token loss over a ``[rows, width]`` grid of scored positions, in the form the
    fused head's fused-loss mode takes: subclasses give :meth:`token_loss`; :meth:`run` is
    called by :class:`~saei_fast.integrations.shared.fused_head.FusedHead` with the scored tokens'
    hidden states and returns their log-probs and entropies (values) while keeping the fused
    loss (``self.fused``, differentiable) for the caller's backward."""

    rows: int
    width: int
    fused: torch.Tensor | None = None

    @abc.abstractmethod
    def token_loss(self, logprobs, entropy, index):
        """The per-token terms at grid positions ``index``."""

    def run(self, hidden, weight, labels, bias, temperature, grid):
        """``(logprobs, entropy)`` values of the scored tokens (``hidden [n, D]`` at grid
        positions ``grid [n]``); the fused loss is kept in ``self.fused``."""
        logprobs = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        entropy = torch.zeros_like(logprobs)

        def recorded(chunk_logprobs, chunk_entropy, index):
            logprobs[index] = chunk_logprobs.detach().float()
            entropy[index] = chunk_entropy.detach().float()
            return self.token_loss(chunk_logprobs, chunk_entropy, grid[index])

        self.fused = linear_token_loss(
            hidden, weight, labels, recorded, bias=bias, temperature=temperature
        )
        return logprobs, entropy


class GRPOTokenLoss(FusedTokenLoss):
    """TRL's token-level GRPO-family loss for one ``_compute_loss`` call, per token.

    Built from the call's ``inputs`` before TRL's code runs; the grid is the completions'
    ``[B, T]``. :meth:`run` gives TRL the log-probs and entropies for its loss and metrics;
    :meth:`combine` checks TRL's value against the fused one and returns a loss with TRL's
    value and the fused gradient.
    """

    def __init__(self, trainer, inputs: dict, *, training: bool) -> None:
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        self.rows, self.width = mask.shape
        self.mask = mask.reshape(-1).float()
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        self.advantages = self._flat(advantages)
        old = inputs.get("old_per_token_logps")
        self.old = None if old is None else self._flat(old)
        self.beta = trainer.beta
        self.ref = self._flat(inputs["ref_per_token_logps"]) if self.beta != 0.0 else None
        self.bias_correction_kl = trainer.args.use_bias_correction_kl
        self.clip = (1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
        self.delta = trainer.args.delta
        self.sampling_ratio = None
        if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
            self.sampling_ratio = self._flat(inputs["importance_sampling_ratio"])
        accumulation = trainer.current_gradient_accumulation_steps if training else 1.0
        self.token_weight = self._token_weights(trainer, inputs, mask, accumulation, training)
        self.entropy_weight = None
        if trainer._entropy_bonus_enabled:
            tokens = mask.sum().clamp(min=1.0)
            self.entropy_weight = trainer.entropy_coef / (tokens * accumulation)

    def _flat(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` or ``[B, 1]`` per-token constants, flat over the completion grid."""
        return values.detach().expand(self.rows, self.width).reshape(-1)

    def _token_weights(self, trainer, inputs, mask, accumulation, training) -> torch.Tensor:
        """Each token's factor in TRL's aggregation of ``per_token_loss * mask``."""
        mask = mask.float()
        if trainer.loss_type == "grpo":
            per_row = 1.0 / (mask.sum(-1, keepdim=True).clamp(min=1.0) * self.rows * accumulation)
            return self._flat(per_row) * self.mask
        if trainer.loss_type == "bnpo":
            return self.mask / (mask.sum().clamp(min=1.0) * accumulation)
        if trainer.loss_type == "dr_grpo":
            return self.mask / (self.rows * trainer.max_completion_length * accumulation)
        # dapo: the generation batch's token count, rescaled to one accumulation window.
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if training:
            normalizer = normalizer * accumulation / trainer.args.steps_per_generation
        return self.mask / normalizer

    def token_loss(self, logprobs, entropy, index):
        """The per-token terms of TRL's loss at completion-grid positions ``index``."""
        old = logprobs.detach() if self.old is None else self.old[index].to(logprobs.dtype)
        coef_1 = torch.exp(logprobs - old)
        advantages = self.advantages[index].to(logprobs.dtype)
        coef_2 = torch.clamp(coef_1, *self.clip)
        if self.delta is not None:
            coef_1 = torch.clamp(coef_1, max=self.delta)
        per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
        if self.sampling_ratio is not None:
            per_token = per_token * self.sampling_ratio[index].to(logprobs.dtype)
        if self.beta != 0.0:
            diff = self.ref[index].to(logprobs.dtype) - logprobs
            kl = torch.exp(diff) - diff - 1
            if self.bias_correction_kl:
                kl = kl * torch.exp(logprobs - old)
            per_token = per_token + self.beta * kl
        loss = per_token * self.token_weight[index].to(logprobs.dtype)
        if self.entropy_weight is not None:
            loss = loss - self.entropy_weight * entropy * self.mask[index].to(entropy.dtype)
        return loss

    def combine(self, trl_loss: torch.Tensor) -> torch.Tensor:
        """TRL's loss value with the fused loss's gradient; raises when they disagree."""
        if self.fused is None:
            raise RuntimeError(
                "saei_fused_loss: the fused head did not run in TRL's loss forward (a wrapped "
                "model or a TRL version that calls the model differently); set "
                "saei_fused_loss=False"
            )
        ours, theirs = self.fused.double(), trl_loss.detach().double()
        if not torch.isclose(ours, theirs, rtol=1e-4, atol=1e-6):
            raise RuntimeError(
                f"saei_fused_loss: the fused loss ({ours.item():.8g}) differs from TRL's "
                f"({theirs.item():.8g}); this TRL version or configuration computes its loss "
                "differently - set saei_fused_loss=False"
            )
        return trl_loss.detach() + (self.fused - self.fused.detach()).to(trl_loss.dtype)
