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
Tested: Qwen2.5-VL, Qwen3-VL, LLaVA and Idefics3 (SmolVLM). Cutting a batch into groups or
micro-batches needs to know which images are whose: see :class:`_RowLayout`.

The model's train/eval mode is left as it is, so dropout during the attack is the caller's
choice (with dropout, the passes of a micro-batched attack draw different masks).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saei_fast.memory import track_peak_memory
from saei_fast.ops import band_entropy_objective, entropy_band_mask, linear_entropy
from saei_fast.ops._checks import (
    check_band,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_same_device,
    check_temperature,
    check_tensor,
)
from saei_fast.pixels.base import PixelSpace

if TYPE_CHECKING:
    from PIL import Image

SCOPES = ("sequence", "group", "batch")


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


@dataclass
class PixelGradient:
    """What :func:`pixel_gradient` returns.

    Attributes:
        grad: d(objective)/d(pixel_values), shaped like ``pixel_values`` (every row's copy of
            an image gets its own rows' share).
        band_mask: bool ``[B, L - 1]``, the selected positions (position t predicts token
            t + 1).
        objective: the band objective's value (nats).
    """

    grad: torch.Tensor
    band_mask: torch.Tensor
    objective: float


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
) -> AttackResult:
    """Adversarial images that raise the band-selected entropy of a VLM's responses.

    Args:
        model: a Hugging Face VLM (e.g. ``Qwen2_5_VLForConditionalGeneration``,
            ``LlavaForConditionalGeneration``), any dtype, attention implementation, train or
            eval mode, with or without gradient checkpointing.
        inputs: the model's batch: ``input_ids [B, L]`` (prompt + completion), optional
            ``attention_mask``, ``pixel_values`` and the other multimodal fields
            (``image_grid_thw``, ``mm_token_type_ids``, ``pixel_attention_mask``, ...), every
            row carrying its own image(s) as the processor produced them. Rows of a group
            (``config.group_size``) must carry identical images.
        completion_mask: bool ``[B, L]``, True on completion tokens (each needs a token
            before it: column 0 must be False).
        space: the pixel space of the model's processor (:func:`saei_fast.pixels.from_processor`).
        config: :class:`AttackConfig` (None: the defaults).

    Returns:
        :class:`AttackResult`.

    Raises:
        TypeError / ValueError: bad model (no pixel inputs, no linear head, logit
            post-processing), inputs, completion mask, config, or groups whose rows carry
            different images; all before any forward pass.
    """
    config = _check_config(config)
    run = _AttackRun(model, inputs, completion_mask, space, config)
    with _frozen(model), track_peak_memory(run.device) as peak:
        clean = run.pixel_values
        adv, band, before = clean, None, 0.0
        for step in range(config.steps):
            gradient = run.gradient(adv, band)
            if step == 0:
                band, before = gradient.band_mask, gradient.objective
            tied = run.tie_groups(gradient.grad)
            moved = space.step(adv, tied, config.alpha, **run.fields)
            adv = space.project(moved, clean, config.eps, **run.fields)
        after = run.objective(adv, band) if config.measure_after else None
    return AttackResult(
        pixel_values=adv,
        images=space.to_pil(adv, **run.fields),
        entropy_before=before,
        entropy_after=after,
        num_selected=int(band.sum()),
        peak_memory_bytes=peak.bytes,
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
    with _frozen(model):
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
        self.base, self.weight, self.bias = _model_parts(model)
        self.inputs = _check_inputs(inputs, self.weight.device)
        self.device = self.weight.device
        self.pixel_values = self.inputs["pixel_values"]
        self.batch_size = self.inputs["input_ids"].shape[0]
        self.predict = _check_completion_mask(completion_mask, self.inputs)
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
            self.layout = _RowLayout(model, self.inputs, space, self.fields)
            self.layout.check_groups(self.pixel_values, group_size)

    # ---- passes ------------------------------------------------------------------------------

    def _chunk_inputs(self, pixels: torch.Tensor, start: int, stop: int) -> dict:
        if self.layout is None:  # one chunk: the whole batch
            return {**self.inputs, "pixel_values": pixels}
        return self.layout.rows({**self.inputs, "pixel_values": pixels}, start, stop)

    def _entropies(self, chunk: dict, predict: torch.Tensor) -> torch.Tensor:
        """Entropies ``[b, L - 1]`` (0 where nothing is predicted) of one chunk."""
        outputs = self.base(**{**chunk, "use_cache": False})
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            hidden = outputs[0]
        # Only completion-predicting positions reach the head: [n, D], never [B, L, V].
        selected = hidden[:, :-1][predict]
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
        chunk_bands, total = [], 0.0
        for start, stop in self.chunks:
            chunk = self._chunk_inputs(pixels, start, stop)
            # A fresh leaf per chunk: the only tensor in the graph that requires grad.
            leaf = chunk["pixel_values"].detach().requires_grad_(True)
            chunk["pixel_values"] = leaf
            predict = self.predict[start:stop]
            with torch.enable_grad():
                entropy = self._entropies(chunk, predict)
                chunk_band = band[start:stop] if band is not None else self._band(entropy, predict)
                objective = _row_sum_objective(entropy, chunk_band)
                if objective is not None:
                    # backward() rather than autograd.grad: reentrant gradient checkpointing
                    # accepts only the former. No parameter requires grad, so the pixels
                    # are the only leaf that receives a gradient.
                    objective.backward()
                    total += float(objective.detach())
            if leaf.grad is not None:
                span = self.layout.pixel_span(start, stop) if self.layout else (0, len(pixels))
                grad[span[0] : span[1]] = leaf.grad
            chunk_bands.append(chunk_band)
        band = torch.cat(chunk_bands) if band is None else band
        rows = int(band.any(-1).sum())
        if rows:
            grad /= rows
        return PixelGradient(grad=grad, band_mask=band, objective=total / rows if rows else 0.0)

    def objective(self, pixels: torch.Tensor, band: torch.Tensor) -> float:
        """The band objective with a fixed band mask (no gradients)."""
        total = 0.0
        with torch.no_grad():
            for start, stop in self.chunks:
                chunk = self._chunk_inputs(pixels, start, stop)
                entropy = self._entropies(chunk, self.predict[start:stop])
                objective = _row_sum_objective(entropy, band[start:stop])
                if objective is not None:
                    total += float(objective)
        rows = int(band.any(-1).sum())
        return total / rows if rows else 0.0

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


def _row_sum_objective(entropy: torch.Tensor, band: torch.Tensor) -> torch.Tensor | None:
    """``band_entropy_objective`` times the number of rows it averages over (None if 0)."""
    rows = int(band.any(-1).sum())
    if rows == 0:
        return None
    return band_entropy_objective(entropy, band) * rows


# -------------------------------------------------------------------------------------------
# Which rows of pixel_values (and of the other fields) belong to which batch row
# -------------------------------------------------------------------------------------------


class _RowLayout:
    """Maps batch rows to their images, so rows can be cut into micro-batches and groups.

    ``pixel_values`` holds "entries" along dim 0 (a Qwen image's patches, one image tensor,
    or one row's images for ``[B, N, C, H, W]``). Rows own contiguous entries: one each when
    there are as many entries as rows; otherwise they are counted from each row's image
    placeholder tokens (``model.config.image_token_id``), per entry from the space (Qwen:
    ``t*h*w / merge**2``) or split evenly (plain tensors).
    """

    def __init__(self, model, inputs: dict, space: PixelSpace, fields: dict) -> None:
        input_ids = inputs["input_ids"]
        self.batch_size = input_ids.shape[0]
        pixel_values = inputs["pixel_values"]
        spans = space.entry_spans(pixel_values, **fields)
        self.entries = self._entries_per_row(model, input_ids, space, fields, len(spans))
        self.spans = spans
        self.plan = _slice_plan(inputs, space, self.batch_size, len(spans))

    def _entries_per_row(self, model, input_ids, space, fields, count) -> list[tuple[int, int]]:
        tokens = space.entry_tokens(**fields)
        if tokens is None and count == self.batch_size:
            return [(row, row + 1) for row in range(self.batch_size)]
        token_id = _image_token_id(model)
        if token_id is None:
            raise ValueError(
                f"pixel_values holds {count} images for {self.batch_size} rows and the model "
                "config has no image_token_id to tell which row owns which image"
            )
        per_row = (input_ids == token_id).sum(1).tolist()
        if tokens is None:
            total = sum(per_row)
            if total % count:
                raise ValueError(
                    f"{total} image tokens do not split evenly over the {count} images of "
                    "pixel_values"
                )
            tokens = [total // count] * count
        bounds, entry = [], 0
        for row, needed in enumerate(per_row):
            first = entry
            while needed > 0 and entry < count:
                needed -= tokens[entry]
                entry += 1
            if needed != 0 or entry == first:
                raise ValueError(
                    f"row {row} of input_ids has {per_row[row]} image tokens, which do not match "
                    f"its images in pixel_values; every row must carry its own image(s)"
                )
            bounds.append((first, entry))
        if entry != count:
            raise ValueError(
                f"input_ids has image tokens for {entry} images but pixel_values holds {count}"
            )
        return bounds

    def pixel_span(self, start: int, stop: int) -> tuple[int, int]:
        """Rows of ``pixel_values`` (dim 0) that batch rows ``[start, stop)`` own."""
        return self.spans[self.entries[start][0]][0], self.spans[self.entries[stop - 1][1] - 1][1]

    def rows(self, inputs: dict, start: int, stop: int) -> dict:
        """The batch restricted to rows ``[start, stop)``."""
        first, last = self.entries[start][0], self.entries[stop - 1][1]
        pixel_start, pixel_stop = self.pixel_span(start, stop)
        out = {}
        for key, value in inputs.items():
            how = self.plan[key]
            if how == "pixels":
                out[key] = value[pixel_start:pixel_stop]
            elif how == "entries":
                out[key] = value[first:last]
            elif how == "rows":
                out[key] = value[start:stop]
            elif how == "rows_dim1":
                out[key] = value[:, start:stop]
            else:
                out[key] = value
        return out

    def check_groups(self, pixel_values: torch.Tensor, group_size: int) -> None:
        for first in range(0, self.batch_size, group_size):
            start, stop = self.pixel_span(first, first + 1)
            image = pixel_values[start:stop]
            for row in range(first + 1, first + group_size):
                other_start, other_stop = self.pixel_span(row, row + 1)
                other = pixel_values[other_start:other_stop]
                if other.shape != image.shape or not torch.equal(other, image):
                    raise ValueError(
                        f"rows {first} and {row} are in one group (group_size={group_size}) "
                        "but carry different images; rows sharing an image must be contiguous"
                    )


def _slice_plan(inputs: dict, space: PixelSpace, batch_size: int, entries: int) -> dict[str, str]:
    """How each field of the batch is cut by rows (checked once, before any work)."""
    plan = {}
    for key, value in inputs.items():
        if key == "pixel_values":
            plan[key] = "pixels"
        elif key in space.image_fields:
            plan[key] = "entries"
        elif not isinstance(value, torch.Tensor) or value.dim() == 0:
            plan[key] = "keep"
        elif key == "position_ids" and value.dim() == 3 and value.shape[1] == batch_size:
            plan[key] = "rows_dim1"  # multimodal RoPE positions [k, B, L]
        elif value.shape[0] == batch_size:
            plan[key] = "rows"
        elif value.shape[0] == entries:
            plan[key] = "entries"
        else:
            raise ValueError(
                f"inputs[{key!r}] has shape {tuple(value.shape)}: neither batch rows "
                f"({batch_size}) nor images ({entries}) along dim 0, so it cannot be split "
                "into micro-batches or groups"
            )
    return plan


def _image_token_id(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# -------------------------------------------------------------------------------------------
# Checks and model access
# -------------------------------------------------------------------------------------------


def _check_config(config: object) -> AttackConfig:
    if config is None:
        return AttackConfig()
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config must be a saei_fast.AttackConfig, got {type(config).__name__}")
    return config


def _model_parts(model: object) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """(base model, head weight ``[V, D]``, head bias or None) of a HF VLM."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if "pixel_values" not in inspect.signature(model.forward).parameters:
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
    base = getattr(model, "base_model", None)
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


def _check_inputs(inputs: object, device: torch.device) -> dict:
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"inputs must be a mapping (the model's batch), got {type(inputs).__name__}"
        )
    inputs = dict(inputs)
    for key in ("input_ids", "pixel_values"):
        if key not in inputs or inputs[key] is None:
            raise ValueError(f"inputs must contain {key!r}, got keys {sorted(inputs)}")
    input_ids = check_tensor("inputs['input_ids']", inputs["input_ids"])
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(
            f"inputs['input_ids'] must be an integer [B, L] tensor, got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}"
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
    return inputs


def _check_completion_mask(completion_mask: object, inputs: dict) -> torch.Tensor:
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
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter requires grad inside; flags (and the multimodal RoPE offsets some VLMs
    cache between calls) are restored on exit, also on error. Train/eval mode is untouched."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    cached = [
        (module, module.rope_deltas) for module in model.modules() if hasattr(module, "rope_deltas")
    ]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, value in cached:
            module.rope_deltas = value
