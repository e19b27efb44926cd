"""Activation checkpointing for the attack inside TRL's generation context.

TRL 1.16's ``unwrap_model_for_generation`` turns a model's activation (gradient)
checkpointing off for generation and back on when the context exits normally. The attack
runs inside that context, and it backpropagates through the whole model: without
checkpointing it keeps every layer's activations for its micro-batch, where the training
step with ``gradient_checkpointing=True`` keeps one layer's. :func:`checkpointing_state`
switches checkpointing on for the attack and puts back the state it found, also on error;
:func:`model_for_attack` is the trainer's whole context for the attack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a Hugging Face model, possibly ``peft``-wrapped) checkpoints its
    layers; False for a model without Hugging Face's checkpointing switch."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(model, name, None)
        if value is not None:
            return bool(value)
    return False


def trainer_checkpointing(args) -> tuple[bool, dict | None]:
    """``(on, kwargs)``: whether a Hugging Face trainer with ``args`` checkpoints the
    model's layers in training, and with which keyword arguments."""
    # transformers >= 5.25 names the setting activation checkpointing; gradient
    # checkpointing is its older name (still an alias there).
    for prefix in ("activation", "gradient"):
        on = getattr(args, f"{prefix}_checkpointing", None)
        if on is not None:
            return bool(on), getattr(args, f"{prefix}_checkpointing_kwargs", None)
    return False, None


def switch_checkpointing(model: torch.nn.Module, on: bool, kwargs: dict | None = None) -> None:
    """Turn ``model``'s activation checkpointing on (with a trainer's checkpointing kwargs) or
    off, with whichever of the two names the installed transformers has."""
    if not on:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        return
    # As the trainer enables it: every_n_layers and offload are the model's own options,
    # the rest goes to torch.utils.checkpoint.
    kwargs = dict(kwargs or {})
    every_n_layers = kwargs.pop("every_n_layers", 1)
    offload = kwargs.pop("offload", False)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs or None,
            every_n_layers=every_n_layers,
            offload=offload,
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


@contextlib.contextmanager
def checkpointing_state(
    model: torch.nn.Module, on: bool, kwargs: dict | None = None
) -> Iterator[None]:
    """Inside: ``model`` checkpoints its layers iff ``on`` (with ``kwargs``, the trainer's
    ``gradient_checkpointing_kwargs``). On exit, also on error, the state found on entry is
    put back. A model without a checkpointing switch is left alone.

    With ``on`` equal to the entry state nothing changes inside; the context then only
    guarantees the entry state on exit, whatever a nested context did.
    """
    supported = hasattr(model, "gradient_checkpointing_enable") or hasattr(
        model, "activation_checkpointing_enable"
    )
    if not supported:
        yield
        return
    found = is_checkpointing(model)
    if found != on:
        switch_checkpointing(model, on, kwargs)
    try:
        yield
    finally:
        if is_checkpointing(model) != found:
            switch_checkpointing(model, found, kwargs)


@contextlib.contextmanager
def model_for_attack(trainer) -> Iterator[torch.nn.Module]:
    """The model a ``GRPOTrainer``'s attack runs on: TRL's generation context (unwrapped,
    DeepSpeed ZeRO-3 parameters gathered, FSDP1 root parameters summoned, as for TRL's
    generation), with activation checkpointing as the trainer's training step has it."""
    # Here, not at the top: the benchmarks use this module's switches without TRL installed.
    from trl.models import unwrap_model_for_generation

    on, kwargs = trainer_checkpointing(trainer.args)
    wrapped = trainer.model_wrapped
    unwrapped = trainer.accelerator.unwrap_model(wrapped)
    # TRL's generation context turns checkpointing off and back on only when it exits
    # normally: the outer guard restores it after an error too.
    with (
        checkpointing_state(unwrapped, is_checkpointing(unwrapped), kwargs),
        unwrap_model_for_generation(
            wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as model,
        trainer._dist.summon_full_params(wrapped, recurse=False),
        # The attack backpropagates through the whole model: with the trainer's
        # checkpointing it keeps one layer's activations, as the training step does.
        checkpointing_state(model, on, kwargs),
    ):
        yield model
