"""The attack's view of a Hugging Face VLM: its parts, the checks on its batch, and the
state (requires-grad flags, train/eval mode, cached RoPE offsets) it holds and restores.

Everything here runs before the first forward pass, so a bad model or batch fails with a
message that names the argument instead of somewhere inside the model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping

import torch

from saei_fast.validation import check_same_device, check_tensor


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a ``peft`` wrapper (LoRA layers included), else
    ``model``. A ``PeftModel``'s own forward takes no ``pixel_values`` and its
    ``base_model`` runs the head, so the attack reads the wrapped model's parts."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional: without it no model can be a PeftModel
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def model_parts(model: object) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """(base model, head weight ``[V, D]``, head bias or None) of a HF VLM."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap_peft(model)
    name = type(model).__name__
    base = getattr(model, "base_model", None)
    # The attack calls the base model, so its forward is the one that must take pixels; the
    # head's forward may hide them in **kwargs (verl's apply_monkey_patch replaces it so).
    takes_pixels = [
        "pixel_values" in inspect.signature(module.forward).parameters
        for module in (model, base)
        if isinstance(module, torch.nn.Module)
    ]
    if not any(takes_pixels):
        raise ValueError(
            f"model {name} takes no pixel_values in its forward: entropy_attack needs a "
            "vision-language model (e.g. Qwen2_5_VLForConditionalGeneration)"
        )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear) or not head.weight.dtype.is_floating_point:
        raise ValueError(
            f"model {name} must have a float nn.Linear output head (get_output_embeddings()), "
            f"got {type(head).__name__}"
        )
    if not isinstance(base, torch.nn.Module) or base is model:
        raise ValueError(
            f"model {name} must wrap a base model (model.base_model) that returns the final "
            "hidden states before the head"
        )
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if softcap is not None or scale not in (None, 1, 1.0):
        raise ValueError(
            f"model {name} transforms its logits after the head (final_logit_softcapping="
            f"{softcap}, logit_scale={scale}); entropy_attack supports plain linear heads"
        )
    return base, head.weight, head.bias


_POSITION_FIELDS = (
    "image_grid_thw",
    "video_grid_thw",
    "attention_mask",
    "mm_token_type_ids",
    "second_per_grid_ts",
)


def with_position_ids(base: torch.nn.Module, inputs: dict) -> dict:
    """``inputs`` with the positions the model's own forward would compute for them.

    Multimodal-RoPE models (Qwen2/2.5/3-VL) compute their 3D position ids in the base
    model's forward from ``mm_token_type_ids`` and ``image_grid_thw``. Replacements of that
    forward (verl's ``apply_monkey_patch``) skip this and expect the caller's
    ``position_ids``; without them every token would get a 1D text position and the gradient
    would silently be another model's. Computing them here, with the model's own
    ``compute_3d_position_ids``, gives the patched and the unpatched forward the same input.
    Positions already in ``inputs`` are kept.
    """
    compute = getattr(base, "compute_3d_position_ids", None)
    if inputs.get("position_ids") is not None or not callable(compute):
        return inputs
    accepted = inspect.signature(compute).parameters
    kwargs = {key: inputs.get(key) for key in _POSITION_FIELDS if key in accepted}
    # No cache: positions from the first token (transformers 5.25 renamed past_key_values to
    # cache and deprecated the old name).
    kwargs.update({name: None for name in ("cache", "past_key_values") if name in accepted})
    position_ids = compute(input_ids=inputs["input_ids"], inputs_embeds=None, **kwargs)
    return inputs if position_ids is None else {**inputs, "position_ids": position_ids}


def check_inputs(inputs: object, device: torch.device) -> dict:
    """The batch as a dict, after checking its token ids, pixel values and attention mask."""
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"inputs must be a mapping (the model's batch), got {type(inputs).__name__}"
        )
    inputs = dict(inputs)
    for key in ("input_ids", "pixel_values"):
        if key not in inputs or inputs[key] is None:
            raise ValueError(f"inputs must contain {key!r}, got keys {sorted(inputs)}")
    input_ids = check_tensor("inputs['input_ids']", inputs["input_ids"])
    dtype = input_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"inputs['input_ids'] must be an integer tensor of token ids, got {dtype}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"inputs['input_ids'] must have shape [B, L], got {tuple(input_ids.shape)}"
        )
    pixel_values = check_tensor("inputs['pixel_values']", inputs["pixel_values"])
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(f"inputs['pixel_values'] must be a float tensor, got {pixel_values.dtype}")
    for key, tensor in (("input_ids", input_ids), ("pixel_values", pixel_values)):
        if tensor.device != device:
            raise ValueError(
                f"inputs[{key!r}] is on {tensor.device} but the model is on {device}; move "
                "the batch to the model's device"
            )
    # Checked first: a NaN image would otherwise surface as a NaN entropy deep in the passes.
    if not bool(torch.isfinite(pixel_values).all()):
        raise ValueError(
            "inputs['pixel_values'] has non-finite values (NaN or +-inf); the attack needs the "
            "processor's finite pixel values"
        )
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None:
        attention_mask = check_tensor("inputs['attention_mask']", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"inputs['attention_mask'] must have the shape of inputs['input_ids'] "
                f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        check_same_device(
            "inputs['attention_mask']", attention_mask, input_ids, "inputs['input_ids']"
        )
    return inputs


def check_completion_mask(completion_mask: object, inputs: dict) -> torch.Tensor:
    """The positions that predict completion tokens, bool ``[B, L - 1]``."""
    input_ids = inputs["input_ids"]
    mask = check_tensor("completion_mask", completion_mask)
    if mask.dtype != torch.bool:
        raise TypeError(
            f"completion_mask must be a bool tensor (True = completion token), got {mask.dtype}; "
            "use mask.bool()"
        )
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask must have the shape of inputs['input_ids'] "
            f"{tuple(input_ids.shape)}, got {tuple(mask.shape)}"
        )
    check_same_device("completion_mask", mask, input_ids, "inputs['input_ids']")
    if not bool(mask.any()):
        raise ValueError("completion_mask marks no completion tokens: nothing to measure")
    if bool(mask[:, 0].any()):
        raise ValueError(
            "completion_mask[:, 0] must be False: a completion token needs a token before it"
        )
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None and bool((mask & ~attention_mask.bool()).any()):
        raise ValueError("completion_mask marks positions that attention_mask marks as padding")
    return mask[:, 1:]


@contextlib.contextmanager
def attack_state(model: torch.nn.Module) -> Iterator[None]:
    """Inside: no parameter requires grad, and the model is in eval mode so that dropout is
    off and every pass sees the same function. Flags, modes (and the multimodal RoPE offsets
    some VLMs cache between calls) are restored on exit, also on error.

    Layers that gradient-checkpoint keep their own ``training`` flag (Hugging Face
    checkpoints only in training mode); their dropout lives in submodules (the attention
    module, ``nn.Dropout``), which are in eval mode like the rest.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    cached = [
        (module, module.rope_deltas) for module in model.modules() if hasattr(module, "rope_deltas")
    ]
    checkpointed = _checkpointing_layers(model)
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        for module, training in modes:
            module.training = training and module in checkpointed
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training
        for module, value in cached:
            module.rope_deltas = value


def _checkpointing_layers(model: torch.nn.Module) -> set[torch.nn.Module]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # not a transformers model: nothing checkpoints the HF way
        return set()
    return {
        module
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
    }
