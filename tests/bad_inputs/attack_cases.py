"""Catalogue: ``saei_fast.entropy_attack`` on a tiny Qwen2.5-VL.

Every entry is a bad argument the attack must reject before its first forward pass; the test
runs each on both paths (``SAEI_IMPL=torch`` and ``triton``) and checks that the model's
backbone was never called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bad_inputs.core import Raises
from saei_fast import AttackConfig
from saei_fast.pixels import ImageSpace


@dataclass(frozen=True)
class AttackCase:
    """``arguments(ctx)`` returns ``(model, inputs, completion_mask, keyword arguments)`` of
    :func:`saei_fast.entropy_attack`, built from the good ones in ``ctx``."""

    id: str
    arguments: Callable[[AttackContext], tuple]
    outcome: Raises


@dataclass
class AttackContext:
    model: torch.nn.Module
    inputs: dict
    completion_mask: torch.Tensor
    space: object
    processor: object
    rows: int
    group_size: int


def _replace(ctx: AttackContext, **fields) -> tuple:
    """The good call with some inputs replaced (None removes the field)."""
    inputs = {**ctx.inputs, **fields}
    inputs = {key: value for key, value in inputs.items() if value is not None}
    return ctx.model, inputs, ctx.completion_mask, _keywords(ctx)


def _keywords(ctx: AttackContext, **overrides) -> dict:
    return {"space": ctx.space, "config": AttackConfig(group_size=ctx.group_size), **overrides}


def _pixels(ctx: AttackContext, value: float, *, every_row: bool = False) -> torch.Tensor:
    pixels = ctx.inputs["pixel_values"].clone()
    if every_row:  # the same bad value in every image: a group of identical NaN images
        pixels[:, 5] = value
    else:
        pixels[0, 5] = value
    return pixels


def _with_keywords(ctx: AttackContext, **overrides) -> tuple:
    """The good call with some keyword arguments replaced."""
    return ctx.model, ctx.inputs, ctx.completion_mask, _keywords(ctx, **overrides)


def _completion(ctx: AttackContext, mask: object) -> tuple:
    return ctx.model, ctx.inputs, mask, _keywords(ctx)


def _first_column(ctx: AttackContext) -> torch.Tensor:
    mask = ctx.completion_mask.clone()
    mask[0, 0] = True
    return mask


def _on_padding(ctx: AttackContext) -> torch.Tensor:
    mask = ctx.completion_mask | (ctx.inputs["attention_mask"] == 0)
    mask[:, 0] = False
    return mask


def _config(ctx: AttackContext, **settings) -> tuple:
    return _with_keywords(ctx, config=AttackConfig(**settings))


ENTRY = {
    "attack/model-object": (
        lambda ctx: (object(), ctx.inputs, ctx.completion_mask, _keywords(ctx)),
        Raises(TypeError, "model"),
    ),
    "attack/inputs-list": (
        lambda ctx: (ctx.model, list(ctx.inputs.values()), ctx.completion_mask, _keywords(ctx)),
        Raises(TypeError, "inputs"),
    ),
    "attack/no-pixel-values": (
        lambda ctx: _replace(ctx, pixel_values=None),
        Raises(ValueError, "pixel_values"),
    ),
    "attack/no-input-ids": (
        lambda ctx: _replace(ctx, input_ids=None),
        Raises(ValueError, "input_ids"),
    ),
    "attack/input-ids-float": (
        lambda ctx: _replace(ctx, input_ids=ctx.inputs["input_ids"].float()),
        Raises(TypeError, r"input_ids'\] must be an integer"),
    ),
    "attack/input-ids-bool": (
        lambda ctx: _replace(ctx, input_ids=ctx.inputs["input_ids"] > 0),
        Raises(TypeError, r"input_ids'\] must be an integer"),
    ),
    "attack/input-ids-1d": (
        lambda ctx: _replace(ctx, input_ids=ctx.inputs["input_ids"][0]),
        Raises(ValueError, r"input_ids'\] must have shape \[B, L\]"),
    ),
    "attack/pixel-values-int": (
        lambda ctx: _replace(ctx, pixel_values=ctx.inputs["pixel_values"].long()),
        Raises(TypeError, "pixel_values"),
    ),
    "attack/pixel-values-nan": (
        lambda ctx: _replace(ctx, pixel_values=_pixels(ctx, math.nan)),
        Raises(ValueError, r"pixel_values'\] has non-finite"),
    ),
    "attack/pixel-values-nan-whole-group": (
        lambda ctx: _replace(ctx, pixel_values=_pixels(ctx, math.nan, every_row=True)),
        Raises(ValueError, r"pixel_values'\] has non-finite"),
    ),
    "attack/pixel-values-inf": (
        lambda ctx: _replace(ctx, pixel_values=_pixels(ctx, -math.inf)),
        Raises(ValueError, r"pixel_values'\] has non-finite"),
    ),
    "attack/pixel-values-row-short": (
        lambda ctx: _replace(ctx, pixel_values=ctx.inputs["pixel_values"][:-1]),
        Raises(ValueError, "image_grid_thw"),
    ),
    "attack/no-image-grid": (
        lambda ctx: _replace(ctx, image_grid_thw=None),
        Raises(TypeError, "image_grid_thw"),
    ),
    "attack/attention-mask-column-short": (
        lambda ctx: _replace(ctx, attention_mask=ctx.inputs["attention_mask"][:, :-1]),
        Raises(ValueError, "attention_mask"),
    ),
    "attack/attention-mask-list": (
        lambda ctx: _replace(ctx, attention_mask=ctx.inputs["attention_mask"].tolist()),
        Raises(TypeError, "attention_mask"),
    ),
    "attack/completion-mask-long": (
        lambda ctx: _completion(ctx, ctx.completion_mask.long()),
        Raises(TypeError, "completion_mask"),
    ),
    "attack/completion-mask-list": (
        lambda ctx: _completion(ctx, ctx.completion_mask.tolist()),
        Raises(TypeError, "completion_mask"),
    ),
    "attack/completion-mask-column-short": (
        lambda ctx: _completion(ctx, ctx.completion_mask[:, :-1]),
        Raises(ValueError, "completion_mask"),
    ),
    "attack/completion-mask-empty": (
        lambda ctx: _completion(ctx, torch.zeros_like(ctx.completion_mask)),
        Raises(ValueError, "completion_mask"),
    ),
    "attack/completion-mask-first-column": (
        lambda ctx: _completion(ctx, _first_column(ctx)),
        Raises(ValueError, r"completion_mask\[:, 0\]"),
    ),
    "attack/completion-mask-on-padding": (
        lambda ctx: _completion(ctx, _on_padding(ctx)),
        Raises(ValueError, "attention_mask"),
    ),
    "attack/space-is-the-processor": (
        lambda ctx: _with_keywords(ctx, space=ctx.processor),
        Raises(TypeError, "space"),
    ),
    "attack/space-of-another-layout": (
        lambda ctx: _with_keywords(ctx, space=ImageSpace(0.5, 0.5)),
        Raises(ValueError, "pixel_values"),
    ),
    "attack/config-dict": (
        lambda ctx: _with_keywords(ctx, config={"alpha": 0.1}),
        Raises(TypeError, "config"),
    ),
    "attack/generator-int": (
        lambda ctx: _with_keywords(ctx, generator=42),
        Raises(TypeError, "generator"),
    ),
    "attack/group-size-not-dividing": (
        lambda ctx: _config(ctx, group_size=ctx.rows - 1),
        Raises(ValueError, "group_size"),
    ),
    "attack/group-over-different-images": (
        lambda ctx: _config(ctx, group_size=ctx.rows),
        Raises(ValueError, "group_size"),
    ),
}


CASES = [AttackCase(name, arguments, outcome) for name, (arguments, outcome) in ENTRY.items()]
