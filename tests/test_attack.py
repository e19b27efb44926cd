"""entropy_attack / pixel_gradient on tiny random-weight Qwen2.5-VL and LLaVA models.

The oracle is ``reference.naive_attack_objective``: full logits from ``model(**inputs)``,
softmax entropy, the band rule by sorting, autograd to the pixels. Qwen's RMSNorm runs in
float32 even in a float64 model, and these random models' pixel gradients come out of large
cancellations, so gradients are compared relative to their largest entry with a float32-ish
tolerance; the band masks must match exactly.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import saei_fast
from saei_fast import AttackConfig, entropy_attack, pixels
from saei_fast.attack import pixel_gradient
from saei_fast.integrations.shared.checkpointing import is_checkpointing, switch_checkpointing
from saei_fast.reference import naive_attack_objective
from saei_fast.tools.testing import (
    random_images,
    tiny_idefics3,
    tiny_idefics3_image_processor,
    tiny_llava,
    tiny_llava_image_processor,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

# Largest |ours - naive| / max |naive| seen: 2e-7 (float64 models), 4e-6 (float32).
GRAD_RTOL = {torch.float64: 1e-5, torch.float32: 1e-4}


# Tiny models: intra-op threads only add synchronisation on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(dtype=torch.float64)


@pytest.fixture(scope="module")
def qwen_processor():
    return tiny_qwen_image_processor(max_side=56)


@pytest.fixture(scope="module")
def qwen_space(qwen_processor):
    return pixels.from_processor(qwen_processor)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(dtype=torch.float64)


@pytest.fixture(scope="module")
def llava_processor():
    return tiny_llava_image_processor()


def _qwen_batch(model, processor, *, groups=2, group_size=3, seed=0, sizes=((56, 56), (28, 56))):
    images = [random_images(1, sizes[i % len(sizes)], seed=seed + i)[0] for i in range(groups)]
    return vlm_batch(model, processor, images, group_size=group_size, seed=seed)


def _naive_gradient(model, batch, **band_args):
    pixel_values = batch.inputs["pixel_values"].detach().clone().requires_grad_(True)
    objective, band_mask = naive_attack_objective(
        model, {**batch.inputs, "pixel_values": pixel_values}, batch.completion_mask, **band_args
    )
    (grad,) = torch.autograd.grad(objective, pixel_values)
    return grad, float(objective.detach()), band_mask


def _assert_gradient_close(ours, naive, dtype):
    scale = float(naive.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, naive, rtol=0, atol=GRAD_RTOL[dtype] * scale)


# -------------------------------------------------------------------------------------------
# Gradient and statistics against the naive way
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["group", "sequence", "batch"])
def test_qwen_gradient_matches_naive_full_logits(qwen, qwen_processor, qwen_space, scope):
    batch = _qwen_batch(qwen, qwen_processor)
    config = AttackConfig(group_size=3, scope=scope)
    ours = pixel_gradient(
        qwen, batch.inputs, batch.completion_mask, space=qwen_space, config=config
    )
    naive, objective, band_mask = _naive_gradient(qwen, batch, scope=scope, group_size=3)
    assert torch.equal(ours.band_mask, band_mask)
    assert ours.objective == pytest.approx(objective, rel=1e-12)
    _assert_gradient_close(ours.grad, naive, torch.float64)


def test_llava_gradient_matches_naive_full_logits(llava, llava_processor):
    batch = vlm_batch(llava, llava_processor, random_images(2, (28, 28), seed=3), group_size=2)
    space = pixels.from_processor(llava_processor)
    ours = pixel_gradient(
        llava, batch.inputs, batch.completion_mask, space=space, config=AttackConfig(group_size=2)
    )
    naive, objective, band_mask = _naive_gradient(llava, batch, group_size=2)
    assert torch.equal(ours.band_mask, band_mask)
    assert ours.objective == pytest.approx(objective, rel=1e-12)
    _assert_gradient_close(ours.grad, naive, torch.float64)


def test_qwen3_vl_gradient_matches_naive_full_logits():
    model = tiny_qwen3_vl(dtype=torch.float64)
    processor = tiny_qwen_image_processor(max_side=64, patch_size=16)
    batch = vlm_batch(model, processor, random_images(2, (64, 64), seed=4), group_size=2)
    space = pixels.from_processor(processor)
    config = AttackConfig(group_size=2, micro_batch_size=1)
    ours = pixel_gradient(model, batch.inputs, batch.completion_mask, space=space, config=config)
    naive, _, band_mask = _naive_gradient(model, batch, group_size=2)
    assert torch.equal(ours.band_mask, band_mask)
    _assert_gradient_close(ours.grad, naive, torch.float64)


def test_idefics3_gradient_matches_naive_and_padding_stays_untouched():
    # [B, N, C, H, W] with pixel_attention_mask: rows 0-1 carry one image, rows 2-3 two, so
    # slot 1 of rows 0-1 is padding.
    model = tiny_idefics3(dtype=torch.float64)
    processor = tiny_idefics3_image_processor()
    images = [random_images(1, (28, 28), seed=1), random_images(2, (28, 28), seed=2)]
    batch = vlm_batch(model, processor, images, group_size=2, seed=3)
    clean, mask = batch.inputs["pixel_values"], batch.inputs["pixel_attention_mask"]
    assert clean.shape == (4, 2, 3, 28, 28) and not bool(mask[:2, 1].any())
    space = pixels.from_processor(processor)

    config = AttackConfig(alpha=3 / 255, group_size=2, micro_batch_size=1)
    ours = pixel_gradient(model, batch.inputs, batch.completion_mask, space=space, config=config)
    naive, _, band_mask = _naive_gradient(model, batch, group_size=2)
    assert torch.equal(ours.band_mask, band_mask)
    _assert_gradient_close(ours.grad, naive, torch.float64)

    result = entropy_attack(model, batch.inputs, batch.completion_mask, space=space, config=config)
    padding = ~mask.bool().unsqueeze(2).expand_as(clean)
    assert torch.equal(result.pixel_values[padding], clean[padding])
    assert float((result.pixel_values != clean)[~padding].double().mean()) > 0.9
    assert torch.equal(result.pixel_values[0], result.pixel_values[1])
    assert len(result.images) == 6  # padded slots give no picture


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_float32_models_with_eager_and_sdpa_attention(family, attn):
    # (HF's eager Qwen2.5-VL attention gives NaN on left padding in float64, so attention
    # implementations are compared in float32, the dtype they are used in.)
    if family == "qwen":
        model = tiny_qwen2_5_vl(attn_implementation=attn)
        processor = tiny_qwen_image_processor(max_side=56)
        batch = _qwen_batch(model, processor, groups=1, group_size=3, seed=7)
    else:
        model = tiny_llava(attn_implementation=attn)
        processor = tiny_llava_image_processor()
        batch = vlm_batch(model, processor, random_images(1, (28, 28), seed=7), group_size=3)
    assert model.config._attn_implementation == attn
    space = pixels.from_processor(processor)
    config = AttackConfig(group_size=3)
    ours = pixel_gradient(model, batch.inputs, batch.completion_mask, space=space, config=config)
    naive, _, band_mask = _naive_gradient(model, batch, group_size=3)
    assert torch.equal(ours.band_mask, band_mask)
    _assert_gradient_close(ours.grad, naive, torch.float32)


@pytest.mark.triton
def test_attack_on_the_triton_kernels(qwen_processor, qwen_space, monkeypatch):
    # What runs on a GPU: linear_entropy and the band select as Triton kernels (here in the
    # interpreter), micro-batched with a first band pass. float32: the kernels' dtype.
    model = tiny_qwen2_5_vl()
    batch = _qwen_batch(model, qwen_processor, groups=1, group_size=3, sizes=((28, 28),))
    config = AttackConfig(group_size=3, micro_batch_size=2)
    monkeypatch.setenv("SAEI_IMPL", "torch")
    torch_path = pixel_gradient(
        model, batch.inputs, batch.completion_mask, space=qwen_space, config=config
    )
    monkeypatch.setenv("SAEI_IMPL", "triton")
    triton_path = pixel_gradient(
        model, batch.inputs, batch.completion_mask, space=qwen_space, config=config
    )
    assert torch.equal(triton_path.band_mask, torch_path.band_mask)
    assert triton_path.objective == pytest.approx(torch_path.objective, rel=1e-6)
    _assert_gradient_close(triton_path.grad, torch_path.grad, torch.float32)


@pytest.mark.parametrize(
    ("scope", "micro_batch_size"),
    [
        ("group", 1),  # groups split over micro-batches: band ranked from a first pass
        ("group", 2),  # micro-batches straddle groups
        ("group", 3),  # one group per micro-batch: no first pass
        ("batch", 4),
        ("sequence", 5),
    ],
)
def test_micro_batches_give_the_full_batch_gradient(
    qwen, qwen_processor, qwen_space, scope, micro_batch_size
):
    batch = _qwen_batch(qwen, qwen_processor, seed=1)
    full = pixel_gradient(
        qwen,
        batch.inputs,
        batch.completion_mask,
        space=qwen_space,
        config=AttackConfig(group_size=3, scope=scope),
    )
    micro = pixel_gradient(
        qwen,
        batch.inputs,
        batch.completion_mask,
        space=qwen_space,
        config=AttackConfig(group_size=3, scope=scope, micro_batch_size=micro_batch_size),
    )
    assert torch.equal(micro.band_mask, full.band_mask)
    assert micro.objective == pytest.approx(full.objective, rel=1e-13)
    scale = float(full.grad.abs().max())
    torch.testing.assert_close(micro.grad, full.grad, rtol=0, atol=1e-12 * scale)


def test_several_images_per_row_with_micro_batches(qwen, qwen_processor, qwen_space):
    # Two images of different grids per row, rows cut one by one: images are assigned to
    # rows by counting each row's image tokens.
    images = [
        random_images(1, (28, 56), seed=1) + random_images(1, (56, 28), seed=2),
        random_images(1, (56, 56), seed=3) + random_images(1, (28, 28), seed=4),
    ]
    batch = vlm_batch(qwen, qwen_processor, images, group_size=2, seed=5)
    assert batch.inputs["image_grid_thw"].shape[0] == 8
    config = AttackConfig(group_size=2, micro_batch_size=1)
    ours = pixel_gradient(
        qwen, batch.inputs, batch.completion_mask, space=qwen_space, config=config
    )
    naive, _, band_mask = _naive_gradient(qwen, batch, group_size=2)
    assert torch.equal(ours.band_mask, band_mask)
    _assert_gradient_close(ours.grad, naive, torch.float64)


def test_llava_several_images_per_row(llava, llava_processor):
    images = [random_images(2, (28, 28), seed=1), random_images(2, (28, 28), seed=2)]
    batch = vlm_batch(llava, llava_processor, images, group_size=2, seed=2)
    space = pixels.from_processor(llava_processor)
    config = AttackConfig(group_size=2, micro_batch_size=1)
    ours = pixel_gradient(llava, batch.inputs, batch.completion_mask, space=space, config=config)
    naive, _, band_mask = _naive_gradient(llava, batch, group_size=2)
    assert torch.equal(ours.band_mask, band_mask)
    _assert_gradient_close(ours.grad, naive, torch.float64)


def test_attack_result_statistics_and_shared_group_image(qwen, qwen_processor, qwen_space):
    batch = _qwen_batch(qwen, qwen_processor, seed=2)
    inputs, grid = batch.inputs, batch.inputs["image_grid_thw"]
    config = AttackConfig(alpha=3 / 255, group_size=3, measure_after=True)
    result = entropy_attack(qwen, inputs, batch.completion_mask, space=qwen_space, config=config)
    naive, objective, band_mask = _naive_gradient(qwen, batch, group_size=3)

    assert result.entropy_before == pytest.approx(objective, rel=1e-12)
    assert result.num_selected == int(band_mask.sum()) > 0
    with torch.no_grad():
        after, _ = naive_attack_objective(
            qwen,
            {**inputs, "pixel_values": result.pixel_values},
            batch.completion_mask,
            band_mask=band_mask,
        )
    assert result.entropy_after == pytest.approx(float(after), rel=1e-12)
    assert isinstance(result.peak_memory_bytes, int) and result.peak_memory_bytes >= 0
    assert result.pixel_values.shape == inputs["pixel_values"].shape
    assert result.pixel_values.dtype == inputs["pixel_values"].dtype
    assert len(result.images) == 6 and result.images[0].size == (56, 56)
    # The PIL images are exactly the adversarial pixel values, and not the clean images.
    expected_pil = qwen_space.to_pil(result.pixel_values, image_grid_thw=grid)
    clean_pil = qwen_space.to_pil(inputs["pixel_values"], image_grid_thw=grid)
    for got, want, clean in zip(result.images, expected_pil, clean_pil, strict=True):
        assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want))
        assert not np.array_equal(np.asarray(got), np.asarray(clean))

    clean_images = qwen_space.to_images(inputs["pixel_values"], image_grid_thw=grid)
    adv_images = qwen_space.to_images(result.pixel_values, image_grid_thw=grid)
    per_row = _per_row_image_gradients(qwen_space, naive, grid)
    image_grads = [sum(per_row[3 * group : 3 * group + 3]) for group in range(2)]
    for group in range(2):
        rows = range(3 * group, 3 * group + 3)
        first = result.pixel_values[_patch_rows(grid, rows[0])]
        for row in rows[1:]:  # every row of a group carries the same adversarial image
            assert torch.equal(result.pixel_values[_patch_rows(grid, row)], first)
        delta = adv_images[rows[0]].double() - clean_images[rows[0]].double()
        expected = clean_images[rows[0]].double() + 3 / 255 * image_grads[group].sign()
        expected = expected.clamp(0, 1) - clean_images[rows[0]].double()
        # the sign of the group-summed gradient decides, except where it is ~0 (rounding)
        decided = image_grads[group].abs() > 1e-6 * image_grads[group].abs().max()
        torch.testing.assert_close(delta[decided], expected[decided], rtol=0, atol=1e-6)


def _patch_rows(grid, row):
    sizes = grid.prod(-1).tolist()
    start = sum(sizes[:row])
    return slice(start, start + sizes[row])


def _per_row_image_gradients(space, grad, grid):
    """Gradient w.r.t. each row's [0, 1] image, by autograd through ``from_images``."""
    images = [
        torch.zeros(
            3, int(h) * space.patch_size, int(w) * space.patch_size, dtype=torch.float64
        ).requires_grad_(True)
        for _, h, w in grid.tolist()
    ]
    rebuilt = space.from_images(images, image_grid_thw=grid)
    return torch.autograd.grad((rebuilt * grad.double()).sum(), images)


# -------------------------------------------------------------------------------------------
# The step raises entropy (first order), and lowers it with the sign flipped
# -------------------------------------------------------------------------------------------


def test_small_step_raises_selected_entropy_on_average(qwen, qwen_processor, qwen_space):
    alpha, gains, flipped, predicted = 2 / 255, [], [], []
    for seed in range(12):
        batch = vlm_batch(
            qwen,
            qwen_processor,
            random_images(1, (56, 56), seed=100 + seed),
            group_size=4,
            seed=seed,
        )
        inputs, clean = batch.inputs, batch.inputs["pixel_values"]
        fields = {"image_grid_thw": inputs["image_grid_thw"]}
        config = AttackConfig(alpha=alpha, group_size=4, measure_after=True)
        gradient = pixel_gradient(
            qwen, inputs, batch.completion_mask, space=qwen_space, config=config
        )
        result = entropy_attack(
            qwen, inputs, batch.completion_mask, space=qwen_space, config=config
        )
        gains.append(result.entropy_after - result.entropy_before)
        # first-order prediction of the change: <gradient, step>
        predicted.append(float((gradient.grad * (result.pixel_values - clean)).sum()))
        # the opposite step: every row's copy moves by -alpha * sign(group-summed gradient)
        group_sum = gradient.grad.reshape(4, -1, clean.shape[1]).sum(0)
        opposite = -group_sum.repeat(4, 1)
        down = qwen_space.project(qwen_space.step(clean, opposite, alpha, **fields), clean)
        with torch.no_grad():
            value, _ = naive_attack_objective(
                qwen,
                {**inputs, "pixel_values": down},
                batch.completion_mask,
                band_mask=gradient.band_mask,
            )
        flipped.append(float(value) - result.entropy_before)
    mean_predicted = statistics.mean(predicted)
    assert mean_predicted > 0
    assert statistics.mean(gains) > 0.5 * mean_predicted
    assert statistics.mean(flipped) < -0.5 * mean_predicted


# -------------------------------------------------------------------------------------------
# The model is left exactly as it was
# -------------------------------------------------------------------------------------------


def _model_state(model):
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "flags": {name: p.requires_grad for name, p in model.named_parameters()},
        "grads": {
            name: (None if p.grad is None else p.grad.clone())
            for name, p in model.named_parameters()
        },
        "training": {name: m.training for name, m in model.named_modules()},
    }


def _assert_same_state(model, before):
    after = _model_state(model)
    assert after["flags"] == before["flags"]
    assert after["training"] == before["training"]
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), name
    for name, value in before["grads"].items():
        if value is None:
            assert after["grads"][name] is None, name
        else:
            assert torch.equal(after["grads"][name], value), name


def _prepared_model():
    """Train mode, vision tower frozen, stale gradients on some parameters."""
    model = tiny_qwen2_5_vl()
    model.train()
    model.model.visual.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "layers.0" in name and param.requires_grad:
            param.grad = torch.randn(param.shape, generator=generator)
    return model


def test_parameters_flags_grads_and_mode_are_untouched(qwen_processor, qwen_space):
    model = _prepared_model()
    batch = _qwen_batch(model, qwen_processor, seed=3)
    model.model.rope_deltas = torch.full((1, 1), 7)
    before = _model_state(model)
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    config = AttackConfig(
        steps=2, eps=4 / 255, group_size=3, micro_batch_size=2, measure_after=True
    )
    entropy_attack(model, batch.inputs, batch.completion_mask, space=qwen_space, config=config)
    _assert_same_state(model, before)
    assert torch.equal(model.model.rope_deltas, torch.full((1, 1), 7))
    assert calls == []  # the head never ran: no [tokens, vocab] logits


def test_state_is_restored_when_the_attack_fails(qwen_processor, qwen_space):
    model = _prepared_model()
    batch = _qwen_batch(model, qwen_processor, seed=4)
    before = _model_state(model)

    def fail(*args, **kwargs):
        assert all(not p.requires_grad for p in model.parameters())  # frozen inside
        raise RuntimeError("boom")

    handle = model.model.language_model.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        entropy_attack(
            model,
            batch.inputs,
            batch.completion_mask,
            space=qwen_space,
            config=AttackConfig(group_size=3),
        )
    handle.remove()
    _assert_same_state(model, before)


def test_head_sees_only_completion_positions(qwen, qwen_processor, qwen_space, monkeypatch):
    batch = _qwen_batch(qwen, qwen_processor, seed=5)
    seen = []
    original = saei_fast.attack.passes.linear_entropy

    def recording(hidden, weight, **kwargs):
        seen.append(tuple(hidden.shape))
        return original(hidden, weight, **kwargs)

    monkeypatch.setattr(saei_fast.attack.passes, "linear_entropy", recording)
    pixel_gradient(
        qwen,
        batch.inputs,
        batch.completion_mask,
        space=qwen_space,
        config=AttackConfig(group_size=3),
    )
    completion_tokens = int(batch.completion_mask.sum())
    assert seen == [(completion_tokens, qwen.config.text_config.hidden_size)]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(qwen, qwen_processor, qwen_space, reentrant):
    model = tiny_qwen2_5_vl(dtype=torch.float64)  # same seed: the weights of `qwen`
    model.train()
    # Under whichever name the installed transformers has (5.24 renamed it).
    switch_checkpointing(model, True, {"use_reentrant": reentrant})
    batch = _qwen_batch(model, qwen_processor, seed=6)
    config = AttackConfig(group_size=3, micro_batch_size=3)
    checkpointed = pixel_gradient(
        model, batch.inputs, batch.completion_mask, space=qwen_space, config=config
    )
    plain = pixel_gradient(
        qwen, batch.inputs, batch.completion_mask, space=qwen_space, config=config
    )
    assert model.training and is_checkpointing(model)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(checkpointed.band_mask, plain.band_mask)
    scale = float(plain.grad.abs().max())
    torch.testing.assert_close(checkpointed.grad, plain.grad, rtol=0, atol=1e-12 * scale)


# -------------------------------------------------------------------------------------------
# Steps and the eps-ball
# -------------------------------------------------------------------------------------------


def test_several_steps_stay_in_the_eps_ball(qwen, qwen_processor, qwen_space):
    batch = _qwen_batch(qwen, qwen_processor, seed=8)
    grid = batch.inputs["image_grid_thw"]
    eps = 3 / 255
    config = AttackConfig(alpha=2 / 255, steps=3, eps=eps, group_size=3, measure_after=True)
    result = entropy_attack(
        qwen, batch.inputs, batch.completion_mask, space=qwen_space, config=config
    )
    clean = qwen_space.to_images(batch.inputs["pixel_values"], image_grid_thw=grid)
    adv = qwen_space.to_images(result.pixel_values, image_grid_thw=grid)
    largest = max(float((a - c).abs().max()) for a, c in zip(adv, clean, strict=True))
    assert eps - 1e-6 <= largest <= eps + 1e-6  # three 2/255 steps reach the ball's edge
    assert all(float(a.min()) >= -1e-6 and float(a.max()) <= 1 + 1e-6 for a in adv)
    assert result.entropy_after > result.entropy_before


# -------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------


def test_config_errors():
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        AttackConfig(alpha=0.0)
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        AttackConfig(alpha=-2 / 255)
    with pytest.raises(TypeError, match="alpha must be a float"):
        AttackConfig(alpha="2/255")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        AttackConfig(steps=0)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        AttackConfig(eps=0.0)
    with pytest.raises(ValueError, match="scope must be one of"):
        AttackConfig(scope="token")
    with pytest.raises(ValueError, match="band must satisfy"):
        AttackConfig(band=(0.6, 0.3))
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        AttackConfig(micro_batch_size=0)
    with pytest.raises(TypeError, match="measure_after must be a bool"):
        AttackConfig(measure_after=1)


def _attack(model, inputs, mask, space, **config):
    return entropy_attack(model, inputs, mask, space=space, config=AttackConfig(**config))


def test_input_errors(qwen, qwen_processor, qwen_space):
    batch = _qwen_batch(qwen, qwen_processor, seed=9)
    inputs, mask = batch.inputs, batch.completion_mask
    with pytest.raises(ValueError, match=r"completion_mask must have the shape .* \(6, \d+\)"):
        _attack(qwen, inputs, mask[:, :-1], qwen_space)
    with pytest.raises(TypeError, match="completion_mask must be a bool tensor"):
        _attack(qwen, inputs, mask.long(), qwen_space)
    with pytest.raises(ValueError, match="no completion tokens"):
        _attack(qwen, inputs, torch.zeros_like(mask), qwen_space)
    first = mask.clone()
    first[0, 0] = True
    with pytest.raises(ValueError, match=r"completion_mask\[:, 0\] must be False"):
        _attack(qwen, inputs, first, qwen_space)
    padded = mask | (inputs["attention_mask"] == 0)
    padded[:, 0] = False
    with pytest.raises(ValueError, match="attention_mask marks as padding"):
        _attack(qwen, inputs, padded, qwen_space)
    with pytest.raises(ValueError, match="group_size=4 must divide the batch size 6"):
        _attack(qwen, inputs, mask, qwen_space, group_size=4)
    with pytest.raises(ValueError, match="rows 0 and 3 are in one group"):
        _attack(qwen, inputs, mask, qwen_space, group_size=6)
    no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="inputs must contain 'pixel_values'"):
        _attack(qwen, no_pixels, mask, qwen_space)
    with pytest.raises(TypeError, match=r"space must be a saei_fast\.pixels space"):
        _attack(qwen, inputs, mask, qwen_processor)
    with pytest.raises(TypeError, match=r"config must be a saei_fast\.AttackConfig"):
        entropy_attack(qwen, inputs, mask, space=qwen_space, config={"alpha": 0.1})
    with pytest.raises(ValueError, match=r"inputs\['stray'\] has shape \(5,\)"):
        _attack(qwen, {**inputs, "stray": torch.zeros(5)}, mask, qwen_space, micro_batch_size=2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="needs autograd"):
        _attack(qwen, inputs, mask, qwen_space)
    short = inputs["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match=r"inputs\['attention_mask'\] must have the shape"):
        _attack(qwen, {**inputs, "attention_mask": short}, mask, qwen_space)
    # A wrong dtype is a TypeError, a wrong shape a ValueError (the project's rule).
    ids = inputs["input_ids"]
    for wrong in (ids.float(), ids > 0):
        with pytest.raises(TypeError, match=r"inputs\['input_ids'\] must be an integer tensor"):
            _attack(qwen, {**inputs, "input_ids": wrong}, mask, qwen_space)
    with pytest.raises(ValueError, match=r"inputs\['input_ids'\] must have shape \[B, L\]"):
        _attack(qwen, {**inputs, "input_ids": ids[0]}, mask, qwen_space)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("group_size", [1, 3])
def test_non_finite_pixel_values_are_named_before_any_forward(
    qwen, qwen_processor, qwen_space, bad, group_size
):
    batch = _qwen_batch(qwen, qwen_processor, seed=9)
    # The same bad value in every row: a group of identical NaN images is still one image.
    pixel_values = batch.inputs["pixel_values"].clone()
    pixel_values[:, 5] = bad
    calls = []
    handle = qwen.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"inputs\['pixel_values'\] has non-finite values"):
            _attack(
                qwen,
                {**batch.inputs, "pixel_values": pixel_values},
                batch.completion_mask,
                qwen_space,
                group_size=group_size,
            )
    finally:
        handle.remove()
    assert calls == []


def test_model_errors(qwen_processor, qwen_space):
    text_only = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=128,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    model = tiny_qwen2_5_vl()
    batch = _qwen_batch(model, qwen_processor, seed=10)
    with pytest.raises(ValueError, match="takes no pixel_values"):
        _attack(text_only, batch.inputs, batch.completion_mask, qwen_space)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        _attack(object(), batch.inputs, batch.completion_mask, qwen_space)
    model.config.text_config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="transforms its logits"):
        _attack(model, batch.inputs, batch.completion_mask, qwen_space)
