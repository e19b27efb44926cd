"""The attack's public functions: :func:`entropy_attack` (the signed steps on the image and
the measurements before and after) and :func:`pixel_gradient` (one gradient, as the attack
computes it). The passes over the model live in :mod:`saei_fast.attack.passes`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from saei_fast.attack.config import AttackConfig, AttackResult, PixelGradient, check_config
from saei_fast.attack.model import attack_state
from saei_fast.attack.passes import AttackRun
from saei_fast.memory import track_peak_memory
from saei_fast.pixels.base import PixelSpace


def entropy_attack(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    completion_mask: torch.Tensor,
    *,
    space: PixelSpace,
    config: AttackConfig | None = None,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Adversarial images that raise the band-selected entropy of a VLM's responses.

    Args:
        model: a Hugging Face VLM (e.g. ``Qwen2_5_VLForConditionalGeneration``,
            ``LlavaForConditionalGeneration``, or either wrapped by ``peft``), any dtype
            (the head may be float32 over a bf16 model), attention implementation, train or
            eval mode, with or without gradient checkpointing.
        inputs: the model's batch: ``input_ids [B, L]`` (prompt + completion), optional
            ``attention_mask`` ``[B, L]``, ``pixel_values`` and the other multimodal fields
            (``image_grid_thw``, ``mm_token_type_ids``, ``pixel_attention_mask``, ...), every
            row carrying its own image(s) as the processor produced them. Rows of a group
            (``config.group_size``) must carry identical images.
        completion_mask: bool ``[B, L]``, True on completion tokens (each needs a token
            before it: column 0 must be False).
        space: the pixel space of the model's processor (:func:`saei_fast.pixels.from_processor`).
        config: :class:`AttackConfig` (None: the defaults).
        generator: CPU ``torch.Generator`` the random signs of ``perturbation="random"`` are
            drawn from (None: the global generator); unused by ``"entropy"``.

    Returns:
        :class:`AttackResult`.

    Raises:
        TypeError / ValueError: bad model (no pixel inputs, no linear head, logit
            post-processing), inputs (non-integer ``input_ids``: TypeError; non-finite
            ``pixel_values``, an ``attention_mask`` of another shape), completion mask,
            config, generator, or groups whose rows carry different images; all before any
            forward pass.
    """
    config = check_config(config)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    run = AttackRun(model, inputs, completion_mask, space, config)
    with attack_state(model), track_peak_memory(run.device) as peak:
        clean = run.pixel_values
        adv, band, before = clean, None, None
        for _ in range(config.steps):
            if config.perturbation == "random":
                if before is None:
                    before = run.measure(clean, None)
                    band = before.band_mask
                direction = run.random_direction(adv, generator)
            else:
                gradient = run.gradient(adv, band)
                if before is None:
                    before, band = gradient, gradient.band_mask
                direction = run.tie_groups(gradient.grad)
            moved = space.step(adv, direction, config.alpha, **run.fields)
            adv = space.project(moved, clean, config.eps, **run.fields)
        after = run.measure(adv, band) if config.measure_after else None
    return AttackResult(
        pixel_values=adv,
        images=space.to_pil(adv, **run.fields),
        entropy_before=before.objective,
        entropy_after=None if after is None else after.objective,
        num_selected=int(band.sum()),
        peak_memory_bytes=peak.bytes,
        group_entropy_before=run.group_values(before.row_objective),
        group_entropy_after=None if after is None else run.group_values(after.row_objective),
    )


def pixel_gradient(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    completion_mask: torch.Tensor,
    *,
    space: PixelSpace,
    config: AttackConfig | None = None,
) -> PixelGradient:
    """Gradient of the band objective w.r.t. ``inputs["pixel_values"]``, as computed by
    :func:`entropy_attack` (same arguments; ``alpha``, ``steps``, ``eps`` and
    ``measure_after`` are unused). Parameters are left untouched as there."""
    config = check_config(config)
    run = AttackRun(model, inputs, completion_mask, space, config)
    with attack_state(model):
        return run.gradient(run.pixel_values, None)
