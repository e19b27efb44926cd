"""Pixel spaces against the real Hugging Face image processors (PIL variants, no downloads).

The processors are the oracle for the layouts: pixel values they produce must convert to the
exact 8-bit pictures they came from, and pictures we produce must re-process to our pixel
values. The direction of a step is checked against autograd through ``from_images``, whose
layout the round trips pin down.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Idefics3ImageProcessorPil, LlavaImageProcessorPil

from saei_fast import pixels
from saei_fast.pixels import ImageSpace, QwenPatchSpace
from saei_fast.tools.testing import tiny_qwen_image_processor

# float32 pixel values are ~1e-7 apart near 1; our conversions run in float64, the
# processor's in float32, so re-processed values agree to a few float32 ulps.
ATOL = 1e-6


def _arrays(sizes, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _pil(arrays):
    return [Image.fromarray(array) for array in arrays]


# Qwen2/2.5-VL (14-pixel patches, CLIP mean/std) and Qwen3-VL-like (16, 0.5/0.5). The sizes
# are multiples of patch_size * merge_size inside the processor's bounds (no resizing), and
# unequal so that several images of different grids share one pixel_values.
QWEN_CASES = {
    "qwen2": (lambda: tiny_qwen_image_processor(max_side=56), [(56, 56), (28, 56), (56, 28)]),
    "qwen3": (lambda: tiny_qwen_image_processor(max_side=64, patch_size=16), [(64, 64), (32, 64)]),
}


def _image_gradients(space, pixel_values, grad, **fields):
    """Oracle: gradient w.r.t. the [0, 1] images of <from_images(images), grad>."""
    images = [
        image.detach().double().requires_grad_(True)
        for image in space.to_images(pixel_values, **fields)
    ]
    rebuilt = space.from_images(images, **fields)
    return torch.autograd.grad((rebuilt * grad.double()).sum(), images)


# -------------------------------------------------------------------------------------------
# Qwen flattened patches
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", QWEN_CASES)
def test_qwen_from_processor_reads_the_processor(case):
    processor = QWEN_CASES[case][0]()
    space = pixels.from_processor(processor)
    assert isinstance(space, QwenPatchSpace)
    assert space.mean == tuple(processor.image_mean)
    assert space.std == tuple(processor.image_std)
    assert (space.patch_size, space.temporal_patch_size, space.merge_size) == (
        processor.patch_size,
        processor.temporal_patch_size,
        processor.merge_size,
    )
    # A full processor (image processor + tokenizer) is read through its image_processor.
    wrapped = pixels.from_processor(SimpleNamespace(image_processor=processor, tokenizer=None))
    assert repr(wrapped) == repr(space)


@pytest.mark.parametrize("case", QWEN_CASES)
def test_qwen_round_trips_are_exact(case):
    make_processor, sizes = QWEN_CASES[case]
    processor = make_processor()
    space = pixels.from_processor(processor)
    arrays = _arrays(sizes, seed=1)
    batch = processor(_pil(arrays), return_tensors="pt")
    pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"]

    images = space.to_images(pixel_values, image_grid_thw=grid)
    patch = processor.patch_size
    assert [tuple(image.shape) for image in images] == [
        (3, int(h) * patch, int(w) * patch) for _, h, w in grid.tolist()
    ]
    for image, array in zip(images, arrays, strict=True):
        expected = torch.from_numpy(array).permute(2, 0, 1).double() / 255
        torch.testing.assert_close(image.double(), expected, rtol=0, atol=ATOL)

    rebuilt = space.from_images(images, image_grid_thw=grid)
    assert rebuilt.dtype == pixel_values.dtype
    torch.testing.assert_close(rebuilt, pixel_values, rtol=0, atol=ATOL)
    for picture, array in zip(space.to_pil(pixel_values, image_grid_thw=grid), arrays, strict=True):
        assert np.array_equal(np.asarray(picture), array)


@pytest.mark.parametrize("case", QWEN_CASES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_qwen_k_over_255_step_survives_pil_and_reprocessing(case, k):
    make_processor, sizes = QWEN_CASES[case]
    processor = make_processor()
    space = pixels.from_processor(processor)
    arrays = _arrays(sizes, seed=k)
    batch = processor(_pil(arrays), return_tensors="pt")
    pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"]
    grad = torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(k))

    adv = space.project(space.step(pixel_values, grad, k / 255, image_grid_thw=grid), pixel_values)
    image_grads = _image_gradients(space, pixel_values, grad, image_grid_thw=grid)
    pictures = space.to_pil(adv, image_grid_thw=grid)
    for picture, array, image_grad in zip(pictures, arrays, image_grads, strict=True):
        direction = image_grad.sign().permute(1, 2, 0).numpy().astype(np.int64)
        expected = np.clip(array.astype(np.int64) + k * direction, 0, 255)
        assert np.array_equal(np.asarray(picture), expected.astype(np.uint8))

    reprocessed = processor(pictures, return_tensors="pt")
    assert torch.equal(reprocessed["image_grid_thw"], grid)
    torch.testing.assert_close(reprocessed["pixel_values"], adv, rtol=0, atol=ATOL)


def test_qwen_step_moves_temporal_copies_together_by_their_summed_gradient():
    processor = tiny_qwen_image_processor(max_side=56)
    space = pixels.from_processor(processor)
    batch = processor(_pil(_arrays([(56, 56)], seed=3)), return_tensors="pt")
    pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"]
    # Copies pull opposite ways with unequal strength: the stronger one decides the sign.
    by_time = torch.randn(pixel_values.shape[0], 3, 1, 14 * 14, dtype=torch.float64)
    grad = torch.cat([3 * by_time, -by_time], dim=2).reshape(pixel_values.shape).float()

    adv = space.step(pixel_values, grad, 2 / 255, image_grid_thw=grid)
    delta = (adv.double() - pixel_values.double()).reshape(-1, 3, 2, 14 * 14)
    assert torch.equal(delta[:, :, 0], delta[:, :, 1])
    std = torch.tensor(space.std, dtype=torch.float64).view(1, 3, 1)
    expected = by_time[:, :, 0].sign() * (2 / 255) / std
    torch.testing.assert_close(delta[:, :, 0], expected, rtol=0, atol=ATOL)


def test_qwen_project_respects_eps_ball_and_pixel_range():
    processor = tiny_qwen_image_processor(max_side=56)
    space = pixels.from_processor(processor)
    batch = processor(_pil(_arrays([(56, 56), (28, 56)], seed=4)), return_tensors="pt")
    clean, grid = batch["pixel_values"], batch["image_grid_thw"]
    far = clean + 3.0 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    eps = 4 / 255

    projected = space.project(far, clean, eps, image_grid_thw=grid)
    for adv_image, clean_image in zip(
        space.to_images(projected, image_grid_thw=grid),
        space.to_images(clean, image_grid_thw=grid),
        strict=True,
    ):
        assert float((adv_image - clean_image).abs().max()) <= eps + ATOL
        assert float(adv_image.min()) >= -ATOL and float(adv_image.max()) <= 1 + ATOL
    # Without eps only the range binds: points inside it do not move (the processor's float32
    # values at levels 0 and 255 may sit an ulp outside the exact range and get clipped).
    inside = space.project(clean, far, image_grid_thw=grid)
    torch.testing.assert_close(inside, clean, rtol=0, atol=ATOL)
    # Projection is idempotent.
    assert torch.equal(space.project(projected, clean, eps, image_grid_thw=grid), projected)


def test_qwen_bf16_pixel_values_keep_their_dtype():
    processor = tiny_qwen_image_processor(max_side=56)
    space = pixels.from_processor(processor)
    batch = processor(_pil(_arrays([(28, 28)], seed=5)), return_tensors="pt")
    pixel_values = batch["pixel_values"].bfloat16()
    adv = space.step(pixel_values, torch.ones_like(pixel_values), 3 / 255)
    assert adv.dtype == torch.bfloat16
    assert space.project(adv, pixel_values, 1 / 255).dtype == torch.bfloat16
    images = space.to_images(adv, image_grid_thw=batch["image_grid_thw"])
    assert images[0].dtype == torch.float32


# -------------------------------------------------------------------------------------------
# Plain image tensors
# -------------------------------------------------------------------------------------------


def _llava_processor():
    return LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def _idefics3_processor():
    # No splitting and 28-pixel images: the processor keeps the size, so the only padding
    # is the empty slot of the row with fewer images.
    return Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 28}, max_image_size={"longest_edge": 28}
    )


@pytest.mark.parametrize("k", [1, 3])
def test_image_space_bchw_round_trip_and_step(k):
    processor = _llava_processor()
    space = pixels.from_processor(processor)
    assert isinstance(space, ImageSpace)
    assert space.mean == tuple(processor.image_mean) and space.std == tuple(processor.image_std)
    arrays = _arrays([(28, 28)] * 3, seed=10 + k)
    pixel_values = processor(_pil(arrays), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (3, 3, 28, 28)

    torch.testing.assert_close(
        space.from_images(space.to_images(pixel_values)), pixel_values, rtol=0, atol=ATOL
    )
    for picture, array in zip(space.to_pil(pixel_values), arrays, strict=True):
        assert np.array_equal(np.asarray(picture), array)

    grad = torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(k))
    adv = space.project(space.step(pixel_values, grad, k / 255), pixel_values)
    pictures = space.to_pil(adv)
    for picture, array, image_grad in zip(pictures, arrays, grad, strict=True):
        direction = image_grad.sign().permute(1, 2, 0).numpy().astype(np.int64)
        expected = np.clip(array.astype(np.int64) + k * direction, 0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(picture), expected)
    reprocessed = processor(pictures, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(reprocessed, adv, rtol=0, atol=ATOL)


def test_image_space_padded_slots_are_untouched_and_skipped():
    processor = _idefics3_processor()
    space = pixels.from_processor(processor)
    arrays = _arrays([(28, 28)] * 3, seed=20)
    rows = [[Image.fromarray(arrays[0])], _pil(arrays[1:])]
    batch = processor(rows, return_tensors="pt")
    pixel_values, mask = batch["pixel_values"], batch["pixel_attention_mask"]
    assert pixel_values.shape == (2, 2, 3, 28, 28)
    assert not bool(mask[0, 1].any())  # row 0 has one image: slot 1 is padding
    fields = space.image_batch_fields(batch)

    pictures = space.to_pil(pixel_values, **fields)  # the empty slot yields no picture
    assert len(pictures) == 3
    assert all(np.array_equal(np.asarray(p), a) for p, a in zip(pictures, arrays, strict=True))
    torch.testing.assert_close(
        space.from_images(space.to_images(pixel_values, **fields), **fields),
        pixel_values,
        rtol=0,
        atol=ATOL,
    )
    grad = torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(0))
    adv = space.step(pixel_values, grad, 2 / 255, **fields)
    assert torch.equal(adv[0, 1], pixel_values[0, 1])
    assert not torch.equal(adv[1, 1], pixel_values[1, 1])
    # project puts padding back even when something else wrote to it
    garbage = adv.clone()
    garbage[0, 1] = 7.0
    projected = space.project(garbage, pixel_values, 2 / 255, **fields)
    assert torch.equal(projected[0, 1], pixel_values[0, 1])
    pictures = space.to_pil(projected, **fields)
    reprocessed = processor([pictures[:1], pictures[1:]], return_tensors="pt")
    torch.testing.assert_close(reprocessed["pixel_values"], projected, rtol=0, atol=ATOL)


def test_image_space_padding_inside_an_image_is_untouched_and_cropped():
    space = ImageSpace([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    generator = torch.Generator().manual_seed(1)
    images = [
        torch.rand(3, 20, 24, generator=generator),
        torch.rand(3, 32, 32, generator=generator),
    ]
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    mask[0, :20, :24] = 1
    mask[1] = 1
    pixel_values = space.from_images(images, pixel_attention_mask=mask)
    assert pixel_values.shape == (2, 3, 32, 32)
    assert torch.equal(pixel_values[0, :, 20:], torch.zeros(3, 12, 32))  # padding is 0

    recovered = space.to_images(pixel_values, pixel_attention_mask=mask)
    for image, original in zip(recovered, images, strict=True):
        torch.testing.assert_close(image, original, rtol=0, atol=ATOL)
    adv = space.step(
        pixel_values,
        torch.randn(pixel_values.shape, generator=generator),
        0.1,
        pixel_attention_mask=mask,
    )
    padding = ~mask.bool().unsqueeze(1).expand_as(pixel_values)
    assert torch.equal(adv[padding], pixel_values[padding])
    assert bool((adv[~padding] != pixel_values[~padding]).all())


def test_image_space_five_dims_without_mask_and_float64():
    space = ImageSpace(0.5, 0.25)
    images = [torch.rand(3, 8, 8, dtype=torch.float64) for _ in range(4)]
    pixel_values = space.from_images(images, images_per_sample=2)
    assert pixel_values.shape == (2, 2, 3, 8, 8) and pixel_values.dtype == torch.float64
    torch.testing.assert_close((pixel_values * 0.25 + 0.5).reshape(4, 3, 8, 8), torch.stack(images))
    for image, original in zip(space.to_images(pixel_values), images, strict=True):
        torch.testing.assert_close(image, original)


def test_from_processor_without_normalization_gives_identity_constants():
    processor = LlavaImageProcessorPil(do_normalize=False)
    space = pixels.from_processor(processor)
    assert space.mean == (0.0, 0.0, 0.0) and space.std == (1.0, 1.0, 1.0)


def test_grayscale_pil():
    space = ImageSpace([0.5], [0.5])
    pixel_values = space.from_images([torch.full((1, 4, 5), 10 / 255)])
    picture = space.to_pil(pixel_values)[0]
    assert picture.mode == "L" and np.asarray(picture).tolist() == [[10] * 5] * 4


# -------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------


def _qwen_batch():
    processor = tiny_qwen_image_processor(max_side=56)
    batch = processor(_pil(_arrays([(28, 56)], seed=6)), return_tensors="pt")
    return pixels.from_processor(processor), batch["pixel_values"], batch["image_grid_thw"]


def test_qwen_errors_name_the_argument():
    space, pixel_values, grid = _qwen_batch()
    with pytest.raises(ValueError, match=r"pixel_values must be \[num_patches, C\*T\*P\*P\]"):
        space.step(pixel_values[:, :100], pixel_values[:, :100], 0.01)
    with pytest.raises(ValueError, match="image_grid_thw describes 16 patches"):
        space.to_images(pixel_values, image_grid_thw=grid * torch.tensor([[1, 1, 2]]))
    with pytest.raises(TypeError, match="to_images needs image_grid_thw"):
        space.to_images(pixel_values)
    with pytest.raises(TypeError, match=r"unexpected \['image_grid_tw'\]"):
        space.to_images(pixel_values, image_grid_tw=grid)
    with pytest.raises(ValueError, match=r"alpha must be finite and > 0, got 0\.0"):
        space.step(pixel_values, pixel_values, 0.0, image_grid_thw=grid)
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        space.step(pixel_values, pixel_values, -1 / 255, image_grid_thw=grid)
    with pytest.raises(ValueError, match="grad must have the shape of pixel_values"):
        space.step(pixel_values, pixel_values[:-1], 0.01, image_grid_thw=grid)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        space.project(pixel_values, pixel_values, 0.0, image_grid_thw=grid)
    video = torch.tensor([[2, 2, 4]])
    doubled = torch.cat([pixel_values, pixel_values])
    with pytest.raises(ValueError, match="videos"):
        space.to_images(doubled, image_grid_thw=video)
    with pytest.raises(ValueError, match="got 2 images but image_grid_thw describes 1"):
        space.from_images([torch.rand(3, 28, 56)] * 2, image_grid_thw=grid)
    with pytest.raises(ValueError, match=r"needs \(28, 56\)"):
        space.from_images([torch.rand(3, 28, 28)], image_grid_thw=grid)


def test_image_space_errors():
    space = ImageSpace([0.5] * 3, [0.5] * 3)
    pixel_values = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[B, N, C, H, W\]"):
        space.step(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), 0.1)
    with pytest.raises(ValueError, match="pixel_values has 1 channel"):
        space.to_images(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"pixel_attention_mask must have shape \(2, 8, 8\)"):
        space.step(pixel_values, pixel_values, 0.1, pixel_attention_mask=torch.ones(2, 8, 9))
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    mask[0, 0, 0] = False  # not a top-left rectangle
    with pytest.raises(ValueError, match="top-left rectangle"):
        space.to_images(pixel_values, pixel_attention_mask=mask)
    with pytest.raises(ValueError, match="need pixel_attention_mask"):
        space.from_images([torch.rand(3, 8, 8), torch.rand(3, 4, 8)])
    with pytest.raises(TypeError, match="images must be a list"):
        space.from_images(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        ImageSpace([0.5] * 3, [0.5, 0.0, 0.5])


def test_from_processor_errors():
    with pytest.raises(TypeError, match="image_mean and image_std"):
        pixels.from_processor(object())
    with pytest.raises(ValueError, match="do_rescale=False"):
        pixels.from_processor(LlavaImageProcessorPil(do_rescale=False))
