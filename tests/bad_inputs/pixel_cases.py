"""Catalogue: ``saei_fast.pixels`` (``from_processor`` and both layouts: Qwen flattened
patches, and ``[B, C, H, W]`` / ``[B, N, C, H, W]`` image tensors)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from bad_inputs.core import Raises, Returns, table
from saei_fast.pixels import ImageSpace, QwenPatchSpace, from_processor

# The CLIP constants of the Qwen-VL image processors.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
QWEN = QwenPatchSpace(MEAN, STD, patch_size=14, temporal_patch_size=2, merge_size=2)
IMAGE = ImageSpace(MEAN, STD)
GRID = torch.tensor([[1, 2, 2]])  # one 28 x 28 image: 4 patches of 14 x 14
ALPHA = 2 / 255
EXACT = {"dtype": torch.float32, "atol": 1e-6, "rtol": 0.0}  # float32 rounding of k/255


def _image(height: int = 28, width: int = 28, *, seed: int = 41, channels: int = 3):
    """An 8-bit picture as [C, H, W] in [0, 1] (k / 255 levels, as processors see them)."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (channels, height, width), generator=generator)
    return levels.double() / 255


def _qwen_pixels() -> torch.Tensor:
    return QWEN.from_images([_image().float()], image_grid_thw=GRID)


def _plain_pixels(*shape: int) -> torch.Tensor:
    """Normalized ``[*shape, C, H, W]`` pixel values of k / 255 pictures."""
    count = math.prod(shape)
    images = [_image(8, 12, seed=42 + index).float() for index in range(count)]
    stacked = IMAGE.from_images(images)
    return stacked.reshape(*shape, *stacked.shape[1:])


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Idefics3-style ``[1, 2, C, 8, 12]`` with a 6 x 9 image in slot 0 and an empty slot."""
    mask = torch.zeros(1, 2, 8, 12, dtype=torch.bool)
    mask[0, 0, :6, :9] = True
    pixels = IMAGE.from_images([_image(6, 9).float()], pixel_attention_mask=mask)
    return pixels, mask


def _with_nan(pixels: torch.Tensor) -> torch.Tensor:
    pixels = pixels.clone()
    pixels.view(-1)[7] = math.nan
    return pixels


def _error(error, names, call) -> tuple:
    return lambda _impl: call(), Raises(error, names)


def _value(call, expected, **tolerance) -> tuple:
    return lambda _impl: call(), Returns(expected, **(tolerance or EXACT))


def _pil_levels(images) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(image).copy()) for image in images]


def _levels(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] in [0, 1] -> the uint8 [H, W, C] array of its PIL image."""
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0)


def _tiny_processor(**overrides):
    """A stand-in image processor with the attributes from_processor reads."""
    settings = {
        "image_mean": list(MEAN),
        "image_std": list(STD),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    return SimpleNamespace(**{**settings, **overrides})


def _space_summary(space) -> tuple:
    return (type(space).__name__, space.mean, space.std, getattr(space, "patch_size", None))


def _step_qwen(grad_value: float):
    pixels = _qwen_pixels()
    moved = QWEN.step(pixels, torch.full_like(pixels, grad_value), ALPHA, image_grid_thw=GRID)
    return QWEN.to_images(moved, image_grid_thw=GRID)


def _padded_step():
    # Padding never moves: every slot, real pixel or not, gets a +1 gradient.
    pixels, mask = _padded()
    moved = IMAGE.step(pixels, torch.ones_like(pixels), ALPHA, pixel_attention_mask=mask)
    padding = ~mask[:, :, None].expand_as(pixels)
    return moved[padding], IMAGE.to_images(moved, pixel_attention_mask=mask)


def _padded_step_expected():
    pixels, mask = _padded()
    padding = ~mask[:, :, None].expand_as(pixels)
    return pixels[padding], [_image(6, 9) + ALPHA]


def _nan_in_padding_to_pil():
    # to_pil leaves padding out, so a NaN there is no error.
    pixels, mask = _padded()
    pixels[0, 1] = math.nan
    return _pil_levels(IMAGE.to_pil(pixels, pixel_attention_mask=mask))


ENTRY = {
    # ---- from_processor ------------------------------------------------------------------
    "pixels/from-processor-object": _error(
        TypeError, "processor", lambda: from_processor(object())
    ),
    "pixels/from-processor-none": _error(TypeError, "processor", lambda: from_processor(None)),
    "pixels/from-processor-no-rescale": _error(
        ValueError, "processor", lambda: from_processor(_tiny_processor(do_rescale=False))
    ),
    "pixels/from-processor-other-rescale": _error(
        ValueError, "processor", lambda: from_processor(_tiny_processor(rescale_factor=2 / 255))
    ),
    "pixels/from-processor-nan-mean": _error(
        ValueError, "mean", lambda: from_processor(_tiny_processor(image_mean=[math.nan] * 3))
    ),
    "pixels/from-processor-zero-std": _error(
        ValueError, "std", lambda: from_processor(_tiny_processor(image_std=[0.5, 0.0, 0.5]))
    ),
    "pixels/from-processor-qwen": _value(
        lambda: _space_summary(from_processor(_tiny_processor())),
        lambda: ("QwenPatchSpace", MEAN, STD, 14),
    ),
    "pixels/from-processor-wrapper": _value(
        lambda: _space_summary(from_processor(SimpleNamespace(image_processor=_tiny_processor()))),
        lambda: ("QwenPatchSpace", MEAN, STD, 14),
    ),
    "pixels/from-processor-plain": _value(
        lambda: _space_summary(from_processor(_tiny_processor(patch_size=None))),
        lambda: ("ImageSpace", MEAN, STD, None),
    ),
    "pixels/from-processor-no-normalize": _value(
        lambda: _space_summary(from_processor(_tiny_processor(do_normalize=False))),
        lambda: ("QwenPatchSpace", (0.0,) * 3, (1.0,) * 3, 14),
    ),
    # ---- constructing spaces -------------------------------------------------------------
    "pixels/space-mean-str": _error(TypeError, "mean", lambda: ImageSpace("gray", 0.5)),
    "pixels/space-mean-empty": _error(ValueError, "mean", lambda: ImageSpace([], 0.5)),
    "pixels/space-std-negative": _error(ValueError, "std", lambda: ImageSpace(0.5, -0.5)),
    "pixels/space-std-inf": _error(ValueError, "std", lambda: ImageSpace(0.5, math.inf)),
    "pixels/space-std-wrong-length": _error(ValueError, "std", lambda: ImageSpace(MEAN, [0.5] * 2)),
    "pixels/space-patch-size-0": _error(
        ValueError,
        "patch_size",
        lambda: QwenPatchSpace(MEAN, STD, patch_size=0, temporal_patch_size=2, merge_size=2),
    ),
    "pixels/space-merge-size-float": _error(
        TypeError,
        "merge_size",
        lambda: QwenPatchSpace(MEAN, STD, patch_size=14, temporal_patch_size=2, merge_size=2.0),
    ),
    # ---- Qwen patches: pixel_values and image_grid_thw -----------------------------------
    "qwen/to-images-list": _error(
        TypeError, "pixel_values", lambda: QWEN.to_images([[0.0]], image_grid_thw=GRID)
    ),
    "qwen/to-images-int": _error(
        TypeError,
        "pixel_values",
        lambda: QWEN.to_images(_qwen_pixels().long(), image_grid_thw=GRID),
    ),
    "qwen/to-images-wrong-width": _error(
        ValueError,
        "pixel_values",
        lambda: QWEN.to_images(_qwen_pixels()[:, :-1], image_grid_thw=GRID),
    ),
    "qwen/to-images-1d": _error(
        ValueError, "pixel_values", lambda: QWEN.to_images(_qwen_pixels()[0], image_grid_thw=GRID)
    ),
    "qwen/no-grid": _error(TypeError, "image_grid_thw", lambda: QWEN.to_images(_qwen_pixels())),
    "qwen/grid-list": _error(
        TypeError,
        "image_grid_thw",
        lambda: QWEN.to_images(_qwen_pixels(), image_grid_thw=[[1, 2, 2]]),
    ),
    "qwen/grid-float": _error(
        TypeError,
        "image_grid_thw",
        lambda: QWEN.to_images(_qwen_pixels(), image_grid_thw=GRID.float()),
    ),
    "qwen/grid-1d": _error(
        ValueError, "image_grid_thw", lambda: QWEN.to_images(_qwen_pixels(), image_grid_thw=GRID[0])
    ),
    "qwen/grid-too-many-patches": _error(
        ValueError,
        "image_grid_thw",
        lambda: QWEN.to_images(_qwen_pixels(), image_grid_thw=torch.tensor([[1, 2, 4]])),
    ),
    "qwen/grid-negative": _error(
        ValueError,
        "image_grid_thw",
        lambda: QWEN.to_images(_qwen_pixels(), image_grid_thw=torch.tensor([[1, -2, -2]])),
    ),
    "qwen/grid-not-multiple-of-merge": _error(
        ValueError,
        "image_grid_thw",
        lambda: QWEN.to_images(_qwen_pixels(), image_grid_thw=torch.tensor([[1, 1, 4]])),
    ),
    "qwen/grid-video": _error(
        ValueError,
        "image_grid_thw",
        lambda: QWEN.to_images(
            torch.cat([_qwen_pixels()] * 2), image_grid_thw=torch.tensor([[2, 2, 2]])
        ),
    ),
    "qwen/unknown-field": _error(
        TypeError,
        "pixel_attention_mask",
        lambda: QWEN.to_images(_qwen_pixels(), image_grid_thw=GRID, pixel_attention_mask=GRID),
    ),
    # ---- Qwen patches: from_images -------------------------------------------------------
    "qwen/from-images-tensor": _error(
        TypeError, "images", lambda: QWEN.from_images(_image()[None], image_grid_thw=GRID)
    ),
    "qwen/from-images-empty": _error(
        ValueError, "images", lambda: QWEN.from_images([], image_grid_thw=GRID)
    ),
    "qwen/from-images-two-channels": _error(
        ValueError, r"images\[0\]", lambda: QWEN.from_images([_image()[:2]], image_grid_thw=GRID)
    ),
    "qwen/from-images-uint8": _error(
        TypeError,
        r"images\[0\]",
        lambda: QWEN.from_images([(_image() * 255).to(torch.uint8)], image_grid_thw=GRID),
    ),
    "qwen/from-images-wrong-size": _error(
        ValueError, r"images\[0\]", lambda: QWEN.from_images([_image(28, 56)], image_grid_thw=GRID)
    ),
    "qwen/from-images-no-grid": _error(
        TypeError, "image_grid_thw", lambda: QWEN.from_images([_image()])
    ),
    # ---- Qwen patches: step --------------------------------------------------------------
    **{
        f"qwen/step-alpha-{label}": _error(
            error,
            "alpha",
            lambda alpha=alpha: QWEN.step(
                _qwen_pixels(), _qwen_pixels(), alpha, image_grid_thw=GRID
            ),
        )
        for label, alpha, error in (
            ("0", 0.0, ValueError),
            ("negative", -ALPHA, ValueError),
            ("nan", math.nan, ValueError),
            ("inf", math.inf, ValueError),
            ("bool", True, TypeError),
            ("str", "2/255", TypeError),
            ("none", None, TypeError),
        )
    },
    "qwen/step-grad-shape": _error(
        ValueError,
        "grad",
        lambda: QWEN.step(_qwen_pixels(), _qwen_pixels()[:2], ALPHA, image_grid_thw=GRID),
    ),
    "qwen/step-grad-int": _error(
        TypeError,
        "grad",
        lambda: QWEN.step(_qwen_pixels(), _qwen_pixels().int(), ALPHA, image_grid_thw=GRID),
    ),
    "qwen/step-grad-nan": _error(
        ValueError,
        "grad",
        lambda: QWEN.step(_qwen_pixels(), _with_nan(_qwen_pixels()), ALPHA, image_grid_thw=GRID),
    ),
    "qwen/step-pixels-nan": _error(
        ValueError,
        "pixel_values",
        lambda: QWEN.step(_with_nan(_qwen_pixels()), _qwen_pixels(), ALPHA, image_grid_thw=GRID),
    ),
    "qwen/step-zero-gradient-moves-nothing": _value(lambda: _step_qwen(0.0), lambda: [_image()]),
    "qwen/step-up": _value(lambda: _step_qwen(1.0), lambda: [_image() + ALPHA]),
    "qwen/step-inf-gradient-is-a-direction": _value(
        lambda: _step_qwen(-math.inf), lambda: [_image() - ALPHA]
    ),
    # ---- Qwen patches: project -----------------------------------------------------------
    **{
        f"qwen/project-eps-{label}": _error(
            error,
            "eps",
            lambda eps=eps: QWEN.project(_qwen_pixels(), _qwen_pixels(), eps, image_grid_thw=GRID),
        )
        for label, eps, error in (
            ("0", 0.0, ValueError),
            ("negative", -0.1, ValueError),
            ("nan", math.nan, ValueError),
            ("bool", True, TypeError),
        )
    },
    "qwen/project-clean-shape": _error(
        ValueError,
        "clean",
        lambda: QWEN.project(_qwen_pixels(), _qwen_pixels()[1:], image_grid_thw=GRID),
    ),
    "qwen/project-adv-list": _error(
        TypeError, "adv", lambda: QWEN.project([0.0], _qwen_pixels(), image_grid_thw=GRID)
    ),
    "qwen/project-adv-nan": _error(
        ValueError,
        "adv",
        lambda: QWEN.project(_with_nan(_qwen_pixels()), _qwen_pixels(), image_grid_thw=GRID),
    ),
    "qwen/project-clean-nan": _error(
        ValueError,
        "clean",
        lambda: QWEN.project(_qwen_pixels(), _with_nan(_qwen_pixels()), image_grid_thw=GRID),
    ),
    "qwen/project-inf-clips-to-white": _value(
        lambda: QWEN.to_images(
            QWEN.project(
                torch.full_like(_qwen_pixels(), math.inf), _qwen_pixels(), image_grid_thw=GRID
            ),
            image_grid_thw=GRID,
        ),
        lambda: [torch.ones(3, 28, 28)],
    ),
    "qwen/project-eps-ball": _value(
        lambda: QWEN.to_images(
            QWEN.project(_qwen_pixels() + 1.0, _qwen_pixels(), 2 * ALPHA, image_grid_thw=GRID),
            image_grid_thw=GRID,
        ),
        lambda: [(_image() + 2 * ALPHA).clamp(max=1.0)],
    ),
    # ---- Qwen patches: to_pil ------------------------------------------------------------
    "qwen/to-pil-nan": _error(
        ValueError,
        "pixel_values",
        lambda: QWEN.to_pil(_with_nan(_qwen_pixels()), image_grid_thw=GRID),
    ),
    "qwen/to-pil-inf": _error(
        ValueError,
        "pixel_values",
        lambda: QWEN.to_pil(_qwen_pixels() + math.inf, image_grid_thw=GRID),
    ),
    "qwen/to-pil-exact-levels": _value(
        lambda: _pil_levels(QWEN.to_pil(_qwen_pixels(), image_grid_thw=GRID)),
        lambda: [_levels(_image())],
        dtype=torch.uint8,
        atol=0.0,
        rtol=0.0,
    ),
    # ---- image tensors [B, C, H, W] / [B, N, C, H, W] ------------------------------------
    "image/pixels-3d": _error(
        ValueError, "pixel_values", lambda: IMAGE.to_images(_plain_pixels(1)[0])
    ),
    "image/pixels-6d": _error(
        ValueError, "pixel_values", lambda: IMAGE.to_images(_plain_pixels(1, 1, 1))
    ),
    "image/pixels-int": _error(
        TypeError, "pixel_values", lambda: IMAGE.to_images(_plain_pixels(2).long())
    ),
    "image/pixels-four-channels": _error(
        ValueError,
        "pixel_values",
        lambda: IMAGE.to_images(torch.zeros(2, 4, 8, 12)),
    ),
    "image/mask-float": _error(
        TypeError,
        "pixel_attention_mask",
        lambda: IMAGE.to_images(_padded()[0], pixel_attention_mask=_padded()[1].float()),
    ),
    "image/mask-shape": _error(
        ValueError,
        "pixel_attention_mask",
        lambda: IMAGE.to_images(_padded()[0], pixel_attention_mask=_padded()[1][:, :1]),
    ),
    "image/mask-not-top-left": _error(
        ValueError,
        "pixel_attention_mask",
        lambda: IMAGE.to_images(_padded()[0], pixel_attention_mask=_padded()[1].flip(-1)),
    ),
    "image/from-images-different-sizes": _error(
        ValueError, "images", lambda: IMAGE.from_images([_image(8, 12), _image(6, 12)])
    ),
    "image/from-images-per-sample-0": _error(
        ValueError,
        "images_per_sample",
        lambda: IMAGE.from_images([_image(8, 12)] * 2, images_per_sample=0),
    ),
    "image/from-images-per-sample-not-dividing": _error(
        ValueError,
        "images_per_sample",
        lambda: IMAGE.from_images([_image(8, 12)] * 3, images_per_sample=2),
    ),
    "image/from-images-per-sample-float": _error(
        TypeError,
        "images_per_sample",
        lambda: IMAGE.from_images([_image(8, 12)] * 2, images_per_sample=1.0),
    ),
    "image/from-images-mask-slot-count": _error(
        ValueError,
        "pixel_attention_mask",
        lambda: IMAGE.from_images([_image(6, 9)] * 2, pixel_attention_mask=_padded()[1]),
    ),
    "image/step-grad-nan-5d": _error(
        ValueError,
        "grad",
        lambda: IMAGE.step(_plain_pixels(2, 2), _with_nan(_plain_pixels(2, 2)), ALPHA),
    ),
    "image/project-eps-inf": _error(
        ValueError, "eps", lambda: IMAGE.project(_plain_pixels(2), _plain_pixels(2), math.inf)
    ),
    "image/to-pil-nan-4d": _error(
        ValueError, "pixel_values", lambda: IMAGE.to_pil(_with_nan(_plain_pixels(2)))
    ),
    "image/round-trip-5d": _value(
        lambda: IMAGE.from_images(IMAGE.to_images(_plain_pixels(2, 2)), images_per_sample=2),
        lambda: _plain_pixels(2, 2).double(),
    ),
    "image/project-eps-ball-4d": _value(
        lambda: IMAGE.to_images(IMAGE.project(_plain_pixels(2) - 10.0, _plain_pixels(2), ALPHA)),
        lambda: [(_image(8, 12, seed=42 + index) - ALPHA).clamp(min=0.0) for index in range(2)],
    ),
    "image/to-pil-exact-levels-4d": _value(
        lambda: _pil_levels(IMAGE.to_pil(_plain_pixels(2))),
        lambda: [_levels(_image(8, 12, seed=42 + index)) for index in range(2)],
        dtype=torch.uint8,
        atol=0.0,
        rtol=0.0,
    ),
    "image/padding-never-moves": _value(_padded_step, _padded_step_expected),
    "image/to-pil-nan-in-padding-only": _value(
        _nan_in_padding_to_pil, lambda: [_levels(_image(6, 9))], dtype=torch.uint8, atol=0.0
    ),
}

CASES = table(ENTRY, dispatches=False)
