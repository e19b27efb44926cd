"""One attack's passes over the model: :class:`AttackRun` checks the model, batch and mask
once, cuts the batch into micro-batches (:class:`~saei_fast.attack.row_layout.RowLayout`)
and runs the band-entropy forward passes, the pixel-gradient backward passes and the
random-sign control, micro-batch by micro-batch.
"""

from __future__ import annotations

import torch

from saei_fast.attack.config import AttackConfig, PixelGradient
from saei_fast.attack.model import (
    check_completion_mask,
    check_inputs,
    model_parts,
    with_position_ids,
)
from saei_fast.attack.row_layout import RowLayout
from saei_fast.ops import band_entropy_objective, entropy_band_mask, linear_entropy
from saei_fast.pixels.base import PixelSpace


class AttackRun:
    """Everything :func:`~saei_fast.attack.entropy_attack` needs, checked before any work."""

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
