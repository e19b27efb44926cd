"""Entropy-guided adversarial images for Hugging Face VLMs (SaEI's EgAS step).

:func:`entropy_attack` raises the band-selected entropy of a group of responses by a signed
gradient step on their image, without ever building ``[tokens, vocab]`` logits and without
computing a single parameter gradient:

1. The base model (``model.base_model``, e.g. ``Qwen2_5_VLModel`` or ``LlavaModel``) runs
   the batch to its final hidden states; the language-model head is skipped.
2. The head's weight and bias (``model.get_output_embeddings()``, an ``nn.Linear``) go to
   :func:`saei_fast.linear_entropy` at the positions that predict completion tokens only
   (the hidden state at position t predicts token t + 1).
3. :func:`saei_fast.entropy_band_mask` picks the middle band of those entropies per scope
   (default: the group of responses to one image) and the gradient of
   :func:`saei_fast.band_entropy_objective` flows back to ``pixel_values`` alone: every
   parameter has ``requires_grad`` switched off for the duration (restored afterwards, also
   on error), so autograd records nothing for them.
4. The gradients of the rows of a group are summed, and the pixel space takes the signed
   step and projects it (:mod:`saei_fast.pixels`), so all rows of a group get one image.

Any Hugging Face VLM whose ``forward`` takes ``pixel_values`` and whose base model returns
the final hidden states works; models that transform logits after the head (soft-capping,
a logit scale) are rejected, since the entropy would not be that of the model's output.
Tested: Qwen2.5-VL, Qwen3-VL, LLaVA and Idefics3 (SmolVLM), also wrapped by ``peft``.
Cutting a batch into groups or micro-batches needs to know which images are whose: see
:class:`saei_fast._row_layout.RowLayout`.

The passes run with the model in eval mode (dropout off, so the gradient is that of the
function being sampled from, and every micro-batch sees the same function); the mode is
restored afterwards, also on error.

``AttackConfig(perturbation="random")`` is the control: the same clean-image measurement
and grouping, but each step moves every pixel by ``alpha`` in a random direction (a sign
drawn from ``generator`` per pixel of each group's image) instead of the gradient's sign,
with no backward pass (NoisyRollout-style sampling with the attack's L-inf size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saei_fast._attack_model import (
    attack_state,
    check_completion_mask,
    check_inputs,
    model_parts,
    with_position_ids,
)
from saei_fast._row_layout import RowLayout
from saei_fast.memory import track_peak_memory
from saei_fast.ops import band_entropy_objective, entropy_band_mask, linear_entropy
from saei_fast.pixels.base import PixelSpace
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
    """Options of :func:`entropy_attack` (validated on construction).

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
    """What :func:`entropy_attack` returns.

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
    """What :func:`pixel_gradient` returns.

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


# -------------------------------------------------------------------------------------------
# Public functions
# -------------------------------------------------------------------------------------------


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
    config = _check_config(config)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    run = _AttackRun(model, inputs, completion_mask, space, config)
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
    config = _check_config(config)
    run = _AttackRun(model, inputs, completion_mask, space, config)
    with attack_state(model):
        return run.gradient(run.pixel_values, None)


# -------------------------------------------------------------------------------------------
# One attack: validated inputs, row layout and the passes over micro-batches
# -------------------------------------------------------------------------------------------


class _AttackRun:
    """Everything :func:`entropy_attack` needs, checked before any work."""

    def __init__(self, model, inputs, completion_mask, space, config: AttackConfig) -> None:
        if not isinstance(space, PixelSpace):
            raise TypeError(
                f"space must be a saei_fast.pixels space (e.g. from_processor(processor)), got "
                f"{type(space).__name__}"
            )
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "entropy_attack needs autograd: call it outside torch.inference_mode()"
            )
        self.base, self.weight, self.bias = model_parts(model)
        self.inputs = check_inputs(inputs, self.weight.device)
        self.device = self.weight.device
        self.pixel_values = self.inputs["pixel_values"]
        self.batch_size = self.inputs["input_ids"].shape[0]
        self.predict = check_completion_mask(completion_mask, self.inputs)
        self.space, self.config = space, config
        self.fields = space.image_batch_fields(self.inputs)
        space.entry_spans(self.pixel_values, **self.fields)  # validates the layout

        group_size = config.group_size or 1
        if self.batch_size % group_size:
            raise ValueError(
                f"config.group_size={group_size} must divide the batch size {self.batch_size}"
            )
        self.group_size = group_size
        # With one row per group, group scope is sequence scope.
        self.scope = "sequence" if config.scope == "group" and group_size == 1 else config.scope
        step = config.micro_batch_size or self.batch_size
        self.chunks = [
            (start, min(start + step, self.batch_size)) for start in range(0, self.batch_size, step)
        ]
        self.layout = None
        if len(self.chunks) > 1 or group_size > 1:
            self.layout = RowLayout(model, self.inputs, space, self.fields)
            self.layout.check_groups(self.pixel_values, group_size)

    # ---- passes ------------------------------------------------------------------------------

    def _chunk_inputs(self, pixels: torch.Tensor, start: int, stop: int) -> dict:
        if self.layout is None:  # one chunk: the whole batch
            return {**self.inputs, "pixel_values": pixels}
        return self.layout.rows({**self.inputs, "pixel_values": pixels}, start, stop)

    def _entropies(self, chunk: dict, predict: torch.Tensor) -> torch.Tensor:
        """Entropies ``[b, L - 1]`` (0 where nothing is predicted) of one chunk."""
        outputs = self.base(**with_position_ids(self.base, {**chunk, "use_cache": False}))
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            hidden = outputs[0]
        # Only completion-predicting positions reach the head: [n, D], never [B, L, V].
        # A head kept in higher precision than the body (TRL's cast_lm_head_to_fp32) gets
        # its hidden states in its own dtype, as the model's head forward would.
        selected = hidden[:, :-1][predict].to(self.weight.dtype)
        values = linear_entropy(
            selected, self.weight, bias=self.bias, temperature=self.config.temperature
        )
        return values.new_zeros(predict.shape).masked_scatter(predict, values)

    def _needs_band_pass(self) -> bool:
        """True when a chunk holds only part of a band scope, so the band must be ranked
        over entropies gathered from all chunks before any gradient pass."""
        if len(self.chunks) == 1 or self.scope == "sequence":
            return False
        if self.scope == "group":
            return (self.chunks[0][1] - self.chunks[0][0]) % self.group_size != 0
        return True

    def _band(self, entropy: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
        return entropy_band_mask(
            entropy.detach(),
            predict,
            band=self.config.band,
            scope=self.scope,
            group_size=self.group_size if self.scope == "group" else None,
        )

    def _band_pass(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            entropy = torch.cat(
                [
                    self._entropies(
                        self._chunk_inputs(pixels, start, stop), self.predict[start:stop]
                    )
                    for start, stop in self.chunks
                ]
            )
        return self._band(entropy, self.predict)

    def gradient(self, pixels: torch.Tensor, band: torch.Tensor | None) -> PixelGradient:
        """Band objective and its pixel gradient, micro-batch by micro-batch.

        The objective is a mean over the R rows with a selected token; each chunk
        contributes (its objective) x (its such rows), and the sum is divided by R at the
        end, so the result does not depend on how rows are split into chunks.
        """
        if band is None and self._needs_band_pass():
            band = self._band_pass(pixels)
        # float32 at least: group sums of bf16 gradients would lose their small terms
        grad = torch.zeros_like(pixels, dtype=torch.promote_types(pixels.dtype, torch.float32))
        chunk_bands, row_values, total = [], [], 0.0
        for start, stop in self.chunks:
            chunk = self._chunk_inputs(pixels, start, stop)
            # A fresh leaf per chunk: the only tensor in the graph that requires grad.
            leaf = chunk["pixel_values"].detach().requires_grad_(True)
            chunk["pixel_values"] = leaf
            predict = self.predict[start:stop]
            with torch.enable_grad():
                entropy = self._entropies(chunk, predict)
                chunk_band = band[start:stop] if band is not None else self._band(entropy, predict)
                row_values.append(_row_objectives(entropy, chunk_band))
                objective = _row_sum_objective(entropy, chunk_band)
                if objective is None:
                    # Nothing selected in this chunk: still run a (zero) backward, so that a
                    # sharded model (FSDP) issues the same collectives on every rank
                    # whatever the chunk's selection; the gradient is exactly 0.
                    objective = entropy.sum() * 0.0
                else:
                    total += float(objective.detach())
                # backward() rather than autograd.grad: reentrant gradient checkpointing
                # accepts only the former. No parameter requires grad, so the pixels are the
                # only leaf that receives a gradient.
                objective.backward()
            if leaf.grad is not None:
                span = self.layout.pixel_span(start, stop) if self.layout else (0, len(pixels))
                grad[span[0] : span[1]] = leaf.grad
            chunk_bands.append(chunk_band)
        band = torch.cat(chunk_bands) if band is None else band
        rows = int(band.any(-1).sum())
        if rows:
            grad /= rows
        return PixelGradient(
            grad=grad,
            band_mask=band,
            objective=total / rows if rows else 0.0,
            row_objective=torch.cat(row_values),
        )

    def measure(self, pixels: torch.Tensor, band: torch.Tensor | None) -> PixelGradient:
        """The band objective without gradients (``grad`` is None), with ``band`` as given
        or, if None, ranked on these pixels' entropies."""
        total, row_values, chunk_bands = 0.0, [], []
        if band is None and self._needs_band_pass():
            band = self._band_pass(pixels)
        with torch.no_grad():
            for start, stop in self.chunks:
                chunk = self._chunk_inputs(pixels, start, stop)
                predict = self.predict[start:stop]
                entropy = self._entropies(chunk, predict)
                chunk_band = band[start:stop] if band is not None else self._band(entropy, predict)
                objective = _row_sum_objective(entropy, chunk_band)
                if objective is not None:
                    total += float(objective)
                row_values.append(_row_objectives(entropy, chunk_band))
                chunk_bands.append(chunk_band)
        band = torch.cat(chunk_bands) if band is None else band
        rows = int(band.any(-1).sum())
        return PixelGradient(
            grad=None,
            band_mask=band,
            objective=total / rows if rows else 0.0,
            row_objective=torch.cat(row_values),
        )

    def group_values(self, row_objective: torch.Tensor) -> torch.Tensor:
        """Per group of ``group_size`` rows: the mean over its rows with a selected token."""
        return row_objective.reshape(-1, self.group_size).nanmean(dim=1)

    def random_direction(
        self, pixels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """A random sign per pixel of each group's image, shaped like ``pixels``; every row
        of a group gets the same signs, and positions that are one pixel (Qwen's temporal
        copies) share theirs, since the signs are drawn on the [0, 1] images."""
        if self.layout is None:  # one row per group and one chunk: the whole batch at once
            return _random_signs(self.space, pixels, self.fields, generator)
        direction = torch.zeros_like(pixels, dtype=torch.promote_types(pixels.dtype, torch.float32))
        for first in range(0, self.batch_size, self.group_size):
            row = self.layout.rows({**self.inputs, "pixel_values": pixels}, first, first + 1)
            signs = _random_signs(
                self.space, row["pixel_values"], self.space.image_batch_fields(row), generator
            )
            for member in range(first, first + self.group_size):
                start, stop = self.layout.pixel_span(member, member + 1)
                direction[start:stop] = signs
        return direction

    def tie_groups(self, grad: torch.Tensor) -> torch.Tensor:
        """Every row of a group gets the sum of the group's gradients (same image, one step)."""
        if self.group_size == 1:
            return grad
        tied = grad.clone()
        for first in range(0, self.batch_size, self.group_size):
            spans = [
                self.layout.pixel_span(row, row + 1)
                for row in range(first, first + self.group_size)
            ]
            total = sum(grad[start:stop] for start, stop in spans)
            for start, stop in spans:
                tied[start:stop] = total
        return tied


def _row_objectives(entropy: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """float64 ``[b]`` on the CPU: each row's mean selected entropy, NaN without selection."""
    entropy, band = entropy.detach().double(), band.to(torch.float64)
    return ((entropy * band).sum(-1) / band.sum(-1)).cpu()


def _random_signs(
    space: PixelSpace, pixels: torch.Tensor, fields: dict, generator: torch.Generator | None
) -> torch.Tensor:
    """``pixels``-shaped direction whose sign is a fair coin per pixel of every image (0 on
    padding): the difference of two images pushed through ``from_images``, so the layout's
    own structure (patches, temporal copies, tiles, padding) comes out right."""
    images = space.to_images(pixels, **fields)
    # [B, N, C, H, W] without a pixel mask: from_images needs the images per row.
    extra = {}
    if pixels.dim() == 5 and "pixel_attention_mask" not in fields:
        extra["images_per_sample"] = pixels.shape[1]
    coins = [
        torch.randint(0, 2, image.shape, generator=generator).to(image.device, image.dtype)
        for image in images
    ]
    middle = [torch.full_like(image, 0.5) for image in images]
    return space.from_images(coins, **fields, **extra) - space.from_images(
        middle, **fields, **extra
    )


def _row_sum_objective(entropy: torch.Tensor, band: torch.Tensor) -> torch.Tensor | None:
    """``band_entropy_objective`` times the number of rows it averages over (None if 0)."""
    rows = int(band.any(-1).sum())
    if rows == 0:
        return None
    return band_entropy_objective(entropy, band) * rows


def _check_config(config: object) -> AttackConfig:
    if config is None:
        return AttackConfig()
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config must be a saei_fast.AttackConfig, got {type(config).__name__}")
    return config
