"""SaEI sampling, independent of any trainer: clean and adversarial groups, group advantages.

For every prompt, :func:`saei_rollout` samples ``n_clean`` responses from the clean image,
asks an attack for one adversarial image from those responses, and samples ``n_adv`` more
from it. The result lays the ``n_clean + n_adv`` rows of a prompt out contiguously (clean
rows first) and names, for every row, the image it was generated from and the image the
policy loss must use (always the clean one: SaEI perturbs sampling, not the update).

Prompts, images and completions are opaque to this module: a trainer decides what they are
(token ids, PIL images, processor outputs) and supplies the two callables that touch the
model. :func:`group_advantages` normalizes rewards over whole groups (clean and adversarial
rows together), as GRPO does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from saei_fast.validation import (
    check_float_tensor,
    check_non_negative_float,
    check_positive_int,
)

Prompt = TypeVar("Prompt")
Image = TypeVar("Image")
Completion = TypeVar("Completion")

GenerateFn = Callable[[list[Prompt], list[Image], int], Sequence[Completion]]
"""``generate(prompts, images, copies)``: one completion per row. ``prompts[i]`` and
``images[i]`` are row i; rows come in runs of ``copies`` identical (prompt, image) pairs, one
run per prompt, so backends that sample ``n`` completions per unique prompt can deduplicate."""

AttackFn = Callable[[list[Prompt], list[Image], list[Completion], int], Sequence[Image]]
"""``attack(prompts, images, completions, group_size)``: one adversarial image per group of
``group_size`` consecutive rows (the clean responses to one prompt and image)."""


@dataclass
class SaEIRollout(Generic[Prompt, Image, Completion]):
    """The sampled groups of one SaEI rollout, ``B = num_groups * (n_clean + n_adv)`` rows.

    Row ``g * (n_clean + n_adv) + j`` belongs to prompt ``g``; it is clean for ``j < n_clean``
    and adversarial otherwise.

    Attributes:
        prompts: ``[B]`` the prompt of every row.
        completions: ``[B]`` what ``generate`` returned for every row.
        generation_images: ``[B]`` the image every row was generated from.
        loss_images: ``[B]`` the image the policy loss (and old / reference log-probs) must
            use: the clean image of the row's prompt, for every row.
        is_adversarial: bool ``[B]``, True on rows generated from the adversarial image.
        adversarial_images: ``[num_groups]`` the attack's image for every prompt.
        n_clean: clean rows per group.
        n_adv: adversarial rows per group.
        attack_seconds: wall-clock time of the attack call.
    """

    prompts: list[Prompt]
    completions: list[Completion]
    generation_images: list[Image]
    loss_images: list[Image]
    is_adversarial: torch.Tensor
    adversarial_images: list[Image]
    n_clean: int
    n_adv: int
    attack_seconds: float

    @property
    def group_size(self) -> int:
        return self.n_clean + self.n_adv


def adversarial_row_mask(num_groups: int, n_clean: int, n_adv: int) -> torch.Tensor:
    """Bool ``[num_groups * (n_clean + n_adv)]``: True on the last ``n_adv`` rows of every
    group, the rows SaEI generates from the adversarial image."""
    check_positive_int("num_groups", num_groups)
    check_positive_int("n_clean", n_clean)
    check_positive_int("n_adv", n_adv)
    row = torch.arange(n_clean + n_adv) >= n_clean
    return row.repeat(num_groups)


def saei_rollout(
    prompts: Sequence[Prompt],
    images: Sequence[Image],
    *,
    n_clean: int,
    n_adv: int,
    generate: GenerateFn,
    attack: AttackFn,
) -> SaEIRollout[Prompt, Image, Completion]:
    """Sample SaEI's clean and adversarial groups.

    1. ``generate`` ``n_clean`` completions per prompt from its clean image;
    2. ``attack`` those rows (grouped by prompt) for one adversarial image per prompt;
    3. ``generate`` ``n_adv`` completions per prompt from its adversarial image;
    4. lay the rows of a prompt out contiguously, clean first.

    Args:
        prompts: one prompt per group.
        images: the clean image of every prompt (same length as ``prompts``).
        n_clean: completions per prompt from the clean image (>= 1).
        n_adv: completions per prompt from the adversarial image (>= 1).
        generate: see :data:`GenerateFn`; called twice (clean rows, then adversarial rows).
        attack: see :data:`AttackFn`; called once, on the clean rows.

    Returns:
        :class:`SaEIRollout`.

    Raises:
        TypeError / ValueError: bad counts or lengths, before ``generate`` is called; a
            ``generate`` or ``attack`` that returns the wrong number of items.
    """
    n_clean = check_positive_int("n_clean", n_clean)
    n_adv = check_positive_int("n_adv", n_adv)
    prompts, images = list(prompts), list(images)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got an empty sequence")
    if len(images) != len(prompts):
        raise ValueError(
            f"images must hold one clean image per prompt ({len(prompts)}), got {len(images)}"
        )
    for name, function in (("generate", generate), ("attack", attack)):
        if not callable(function):
            raise TypeError(f"{name} must be callable, got {type(function).__name__}")

    num_groups = len(prompts)
    clean_prompts = _repeat_each(prompts, n_clean)
    clean_images = _repeat_each(images, n_clean)
    clean = _checked("generate", generate(clean_prompts, clean_images, n_clean), len(clean_prompts))

    start = time.perf_counter()
    adversarial = _checked(
        "attack", attack(clean_prompts, clean_images, clean, n_clean), num_groups
    )
    attack_seconds = time.perf_counter() - start

    adv_prompts = _repeat_each(prompts, n_adv)
    adv_images = _repeat_each(adversarial, n_adv)
    adv = _checked("generate", generate(adv_prompts, adv_images, n_adv), len(adv_prompts))

    completions, generation_images = [], []
    for group in range(num_groups):
        completions += clean[group * n_clean : (group + 1) * n_clean]
        completions += adv[group * n_adv : (group + 1) * n_adv]
        generation_images += [images[group]] * n_clean + [adversarial[group]] * n_adv
    group_size = n_clean + n_adv
    return SaEIRollout(
        prompts=_repeat_each(prompts, group_size),
        completions=completions,
        generation_images=generation_images,
        loss_images=_repeat_each(images, group_size),
        is_adversarial=adversarial_row_mask(num_groups, n_clean, n_adv),
        adversarial_images=adversarial,
        n_clean=n_clean,
        n_adv=n_adv,
        attack_seconds=attack_seconds,
    )


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages over contiguous groups of ``group_size`` rewards.

    ``r - mean(group)``, divided by ``std(group) + eps`` when ``scale`` (unbiased std, as
    ``torch.std``). A group of identical rewards (including a group of one) gets exactly 0.
    Computed in float64 (float32 on MPS, which has no float64) and returned in the rewards'
    dtype, so half-precision rewards whose spread overflows fp16 (e.g. +-60000) and float32
    rewards near its largest value still get their advantages.

    Args:
        rewards: float ``[B]``, finite (no NaN or +-inf); ``B`` a multiple of ``group_size``.
        group_size: rows per group (>= 1).
        scale: divide by the group's standard deviation.
        eps: added to the standard deviation (>= 0).

    Returns:
        ``[B]`` advantages, in the dtype and on the device of ``rewards``.

    Raises:
        TypeError / ValueError: non-float or non-1-D rewards, NaN or infinite rewards, a
            group size that does not divide ``B``, bad ``scale`` or ``eps``.
    """
    rewards = check_float_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    group_size = check_positive_int("group_size", group_size)
    if rewards.numel() % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the number of rewards {rewards.numel()}"
        )
    if not isinstance(scale, bool):
        raise TypeError(f"scale must be a bool, got {type(scale).__name__}")
    eps = check_non_negative_float("eps", eps)
    # Rewards are a few numbers per batch: one host check here buys a clear ValueError (an
    # infinite reward would make its whole group's mean and std NaN).
    non_finite = ~torch.isfinite(rewards)
    if bool(non_finite.any()):
        index = non_finite.nonzero()[0].item()
        raise ValueError(
            f"rewards must be finite, got {rewards[index].item()} at index {index} "
            "(NaN and +-inf rewards are rejected)"
        )

    # float64: a [B] tensor costs nothing, and fp16 or near-float32-max rewards must not
    # overflow in the mean or the variance.
    work_dtype = torch.float32 if rewards.device.type == "mps" else torch.float64
    grouped = rewards.reshape(-1, group_size).to(work_dtype)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    # Rounding in the mean can leave a residue of ~1 ulp in a constant group, which eps
    # would blow up; such a group carries no signal, so it gets exactly 0.
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    advantages = torch.where(constant, torch.zeros_like(centered), centered)
    return advantages.reshape(-1).to(rewards.dtype)


def _repeat_each(items: list, copies: int) -> list:
    return [item for item in items for _ in range(copies)]


def _checked(name: str, result: object, expected: int) -> list:
    """``result`` as a list, after checking that it holds ``expected`` items."""
    if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
        raise TypeError(f"{name} must return a sequence, got {type(result).__name__}")
    if len(result) != expected:
        raise ValueError(f"{name} must return {expected} items, got {len(result)}")
    return list(result)
