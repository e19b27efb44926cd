"""The attack's options and results: :class:`AttackConfig` (checked on construction), what
:func:`~saei_fast.attack.entropy_attack` returns (:class:`AttackResult`), what one gradient
or measuring pass returns (:class:`PixelGradient`), and the accepted ``scope`` and
``perturbation`` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saei_fast.validation import (
    check_band,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_temperature,
)

if TYPE_CHECKING:
    from PIL import Image

SCOPES = ("sequence", "group", "batch")
PERTURBATIONS = ("entropy", "random")


@dataclass(frozen=True)
class AttackConfig:
    """Options of :func:`~saei_fast.attack.entropy_attack` (validated on construction).

    Attributes:
        alpha: step in [0, 1] pixel units (the paper: 2/255 or 3/255), > 0.
        steps: signed-gradient steps; the paper uses one and warns that more make entropy
            spike and accuracy collapse, so more must be asked for explicitly.
        eps: optional L-inf radius around the clean image, [0, 1] units.
        band: ``(lo, hi)`` rank fractions of the selected entropy band.
        scope: where ranks are taken: ``"sequence"``, ``"group"`` or ``"batch"``.
        group_size: rows per group sharing one image (contiguous); None: one row per group.
        temperature: sampling temperature the entropies are computed at.
        micro_batch_size: rows per forward/backward pass (None: all at once); memory is
            bounded by one micro-batch, the gradient is the same.
        measure_after: also measure the objective on the adversarial image (one more
            forward without gradients, same band mask).
        perturbation: ``"entropy"`` (SaEI: the signed gradient of the band objective) or
            ``"random"`` (the control: a random sign per pixel, same ``alpha``, ``steps``
            and ``eps``, no gradient; the objective is still measured).
    """

    alpha: float = 2 / 255
    steps: int = 1
    eps: float | None = None
    band: tuple[float, float] = (1 / 3, 2 / 3)
    scope: str = "group"
    group_size: int | None = None
    temperature: float = 1.0
    micro_batch_size: int | None = None
    measure_after: bool = False
    perturbation: str = "entropy"

    def __post_init__(self) -> None:
        def normalize(name, value):
            object.__setattr__(self, name, value)

        normalize("alpha", check_positive_float("alpha", self.alpha))
        normalize("steps", check_positive_int("steps", self.steps))
        if self.eps is not None:
            normalize("eps", check_positive_float("eps", self.eps))
        normalize("band", check_band(self.band))
        check_choice("scope", self.scope, SCOPES)
        if self.group_size is not None:
            check_positive_int("group_size", self.group_size)
        normalize("temperature", check_temperature(self.temperature))
        if self.micro_batch_size is not None:
            check_positive_int("micro_batch_size", self.micro_batch_size)
        if not isinstance(self.measure_after, bool):
            raise TypeError(
                f"measure_after must be a bool, got {type(self.measure_after).__name__}"
            )
        check_choice("perturbation", self.perturbation, PERTURBATIONS)


@dataclass
class AttackResult:
    """What :func:`~saei_fast.attack.entropy_attack` returns.

    Attributes:
        pixel_values: adversarial pixel values, same layout, shape and dtype as the input's.
        images: the adversarial images as PIL images, one per image of ``pixel_values`` in
            its order (so every row of a group repeats its group's image).
        entropy_before: the band objective (nats) on the clean images.
        entropy_after: the same objective, same band mask, on the adversarial images (only
            with ``measure_after=True``, else None).
        num_selected: number of completion tokens in the band.
        group_entropy_before: float64 ``[num_groups]`` (CPU), the band objective of each group
            of ``config.group_size`` rows on the clean image; NaN for a group without a
            selected token.
        group_entropy_after: the same on the adversarial image (``measure_after=True``, else
            None).
        peak_memory_bytes: extra memory at the attack's peak: on CUDA the allocator's peak
            above what was allocated on entry (exact); on the CPU the rise of the process's
            resident-set high-water mark (Linux; 0 elsewhere), which misses memory the
            allocator reuses from earlier work, so it is a lower bound.
    """

    pixel_values: torch.Tensor
    images: list[Image.Image]
    entropy_before: float
    entropy_after: float | None
    num_selected: int
    peak_memory_bytes: int
    group_entropy_before: torch.Tensor | None = None
    group_entropy_after: torch.Tensor | None = None


@dataclass
class PixelGradient:
    """What :func:`~saei_fast.attack.pixel_gradient` returns.

    Attributes:
        grad: d(objective)/d(pixel_values), shaped like ``pixel_values`` (every row's copy of
            an image gets its own rows' share); None for a measurement without gradient.
        band_mask: bool ``[B, L - 1]``, the selected positions (position t predicts token
            t + 1).
        objective: the band objective's value (nats).
        row_objective: float64 ``[B]`` (CPU), each row's mean selected entropy (NaN for a
            row without a selected token); the objective is their mean over selected rows.
    """

    grad: torch.Tensor | None
    band_mask: torch.Tensor
    objective: float
    row_objective: torch.Tensor


def check_config(config: object) -> AttackConfig:
    """``config`` itself, or the defaults for None; anything else is a TypeError."""
    if config is None:
        return AttackConfig()
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config must be a saei_fast.AttackConfig, got {type(config).__name__}")
    return config
