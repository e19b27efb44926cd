"""saei-fast's fused head for the log-probs and entropies of TRL's loss, old and reference
passes (``SaEIConfig(saei_fused_head=True)``).

TRL 1.16 computes them in ``GRPOTrainer._get_per_token_logps_and_entropies``, which slices
the batch, then calls ``model(**inputs, labels=labels, fused_lm_head=True)`` (TRL's chunked
head, installed on the model by ``add_fused_lm_head``). :class:`FusedHead` stands in for
``model`` in that one call: the same backbone forward, then
:func:`saei_fast.linear_logprobs_and_entropy` on the positions whose label is not -100,
with the same semantics as TRL's head (temperature, logit multipliers folded into the
temperature, ``cast_lm_head_to_fp32``). Everything else (slicing, autocast, the loss) stays
TRL's. Models or calls it cannot serve exactly go to TRL's head (:func:`unsupported_reason`).

Under DDP the call goes through the ``DistributedDataParallel`` wrapper's own forward, with
the fused computation as the wrapped module's forward for that one call: DDP then prepares
its gradient reduction exactly as for TRL's head (the parameters reached from the output,
the all-reduce hooks armed), so each gradient is all-reduced once in the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers.utils import ModelOutput

from saei_fast.attack.model import unwrap_peft
from saei_fast.ops import linear_logprobs_and_entropy


def logit_multiplier(text_config) -> float:
    """The factor a model applies to its logits after the head, read as TRL's head reads it
    (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if text_config.model_type == "hyperclovax" else 1.0 / scaling
    return 1.0


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why :class:`FusedHead` cannot stand in for ``model`` (None: it can)."""
    hf_model = unwrap_peft(model)
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "prompt-learning PEFT adapters change the labels"
    get_head = getattr(hf_model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear):
        return f"the output head is {type(head).__name__}, not an nn.Linear"
    text_config = hf_model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        return "the model soft-caps its logits (final_logit_softcapping)"
    if not logit_multiplier(text_config) > 0:
        return "the model's logit multiplier is not positive"
    return None


@dataclass
class FusedHeadOutput(ModelOutput):
    """What :class:`FusedHead` returns: TRL's fields, and in fused-loss mode the fused loss
    (``loss``, differentiable), so that DDP finds the parameters it depends on."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    loss: torch.Tensor | None = None


def fused_head_for(model: object, unwrapped: torch.nn.Module) -> tuple | None:
    """``(module, wrapper)`` for :class:`FusedHead` when it can stand in for ``model`` in
    TRL's call: the module itself (``wrapper`` None), or the module inside a DDP wrapper
    (``unwrapped``, what accelerate unwraps ``model`` to). None for any other wrapper
    (FSDP, DeepSpeed), whose forward does more than run the module."""
    if model is unwrapped:
        return unwrapped, None
    if isinstance(model, DistributedDataParallel) and model.module is unwrapped:
        return unwrapped, model
    return None


@contextlib.contextmanager
def _forward_of(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """``module.forward`` is ``forward`` inside (for one call through its wrapper); the
    instance's own forward (TRL's fused-head forward) is put back on exit, also on error."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class FusedHead:
    """Callable in place of ``model`` for TRL's ``fused_lm_head=True`` call.

    Args:
        model: the (unwrapped, possibly ``peft``) policy or reference model on which TRL
            installed its fused head.
        temperature: the temperature TRL's head divides by.
        loss: a ``FusedTokenLoss`` (:mod:`.fused_loss`) when the call is a training-loss
            forward with ``saei_fused_loss``: the head then also takes the loss's gradient.
        wrapper: the ``DistributedDataParallel`` wrapping ``model``, whose forward the call
            then goes through (see the module docstring); None for an unwrapped model.

    With ``cast_lm_head_to_fp32`` TRL keeps the head's weight in float32; the hidden states
    are cast to the weight's dtype, which is that setting's semantics.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        temperature: float,
        loss=None,
        wrapper: DistributedDataParallel | None = None,
    ) -> None:
        self.model = model
        self.loss = loss
        self.wrapper = wrapper
        self.hf_model = unwrap_peft(model)
        text_config = self.hf_model.config.get_text_config()
        # logits * m / T: the multiplier folds into the temperature.
        self.temperature = temperature / logit_multiplier(text_config)

    def __call__(self, *args, labels: torch.Tensor, fused_lm_head: bool = True, **kwargs):
        outer = self.model if self.wrapper is None else self.wrapper
        if not fused_lm_head or kwargs.get("output_router_logits"):
            # MoE load-balancing losses come from TRL's head, which requests the router logits.
            return outer(*args, labels=labels, fused_lm_head=fused_lm_head, **kwargs)
        if self.wrapper is None:
            return self._forward(*args, labels=labels, **kwargs)
        with _forward_of(self.model, self._forward):
            output = self.wrapper(*args, labels=labels, **kwargs)
        if self.loss is not None:
            # What DDP handed back: with find_unused_parameters it routes the outputs
            # through its own autograd node, and the backward must start from those.
            self.loss.fused = output.loss
        return output

    def _forward(self, *args, labels: torch.Tensor, **kwargs) -> FusedHeadOutput:
        """The backbone, then saei-fast's head on the scored positions."""
        kwargs["use_cache"] = False
        backbone = self.hf_model.base_model(*args, **kwargs)
        head = self.hf_model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden = backbone.last_hidden_state[:, :-1].to(weight.device)
        labels = labels[:, 1:].to(weight.device)
        mask = labels != -100
        # Only the scored positions reach the head; autocast off so that the head runs in
        # its weight's dtype (float32 with cast_lm_head_to_fp32), as in TRL's head.
        with torch.autocast(hidden.device.type, enabled=False):
            scored, scored_labels = hidden[mask].to(weight.dtype), labels[mask]
            if self.loss is None:
                logps, entropy = linear_logprobs_and_entropy(
                    scored, weight, scored_labels, bias=bias, temperature=self.temperature
                )
            else:
                logps, entropy = self.loss.run(
                    scored,
                    weight,
                    scored_labels,
                    bias,
                    self.temperature,
                    self._completion_positions(mask),
                )
        zeros = logps.new_zeros(mask.shape)
        return FusedHeadOutput(
            log_probs=zeros.masked_scatter(mask, logps),
            entropy=zeros.masked_scatter(mask, entropy),
            label_mask=mask,
            loss=None if self.loss is None else self.loss.fused,
        )

    def _completion_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Flat positions in the loss's ``[rows, width]`` grid of the scored tokens
        (``mask [B, L - 1]``: the grid is its last ``width`` columns, the completions')."""
        rows, width = self.loss.rows, self.loss.width
        if mask.shape[0] != rows or mask.shape[1] < width:
            raise RuntimeError(
                f"saei_fused_loss: TRL's loss forward scored a [{mask.shape[0]}, "
                f"{mask.shape[1]}] batch, not the [{rows}, {width}] completions of its inputs"
            )
        row, column = mask.nonzero(as_tuple=True)
        offset = mask.shape[1] - width
        if bool((column < offset).any()):
            raise RuntimeError("saei_fused_loss: a scored token lies outside the completion")
        return row * width + (column - offset)
