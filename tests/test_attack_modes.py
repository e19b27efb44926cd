"""entropy_attack beyond the plain case: the random-sign control, per-group statistics,
dropout (eval mode during the attack), a float32 head over a bf16 model, and LoRA (peft).

The oracle stays ``reference.naive_attack_objective`` (full logits, sorting, autograd).
"""

from __future__ import annotations

import copy

import pytest
import torch

from saei_fast import AttackConfig, entropy_attack, pixels
from saei_fast.attack import pixel_gradient
from saei_fast.attack.row_layout import RowLayout
from saei_fast.integrations.shared.checkpointing import switch_checkpointing
from saei_fast.reference import naive_attack_objective
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

ALPHA = 3 / 255


# Tiny models: intra-op threads only add synchronisation on a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_5_vl(dtype=torch.float64)


@pytest.fixture(scope="module")
def processor():
    return tiny_qwen_image_processor(max_side=56)


@pytest.fixture(scope="module")
def space(processor):
    return pixels.from_processor(processor)


def _batch(model, processor, *, seed=0, groups=2, group_size=3):
    sizes = ((56, 56), (28, 56))
    images = [random_images(1, sizes[i % 2], seed=seed + i)[0] for i in range(groups)]
    return vlm_batch(model, processor, images, group_size=group_size, seed=seed)


def _rows(grid, row):
    sizes = grid.prod(-1).tolist()
    return slice(sum(sizes[:row]), sum(sizes[: row + 1]))


# ---- the random-sign control -------------------------------------------------------------------


def test_random_perturbation_steps_alpha_per_pixel_without_gradient(qwen, processor, space):
    batch = _batch(qwen, processor, seed=1)
    inputs, grid = batch.inputs, batch.inputs["image_grid_thw"]
    grad_modes = []
    handle = qwen.model.register_forward_pre_hook(
        lambda *args: grad_modes.append(torch.is_grad_enabled())
    )
    config = AttackConfig(alpha=ALPHA, group_size=3, measure_after=True, perturbation="random")
    try:
        result = entropy_attack(
            qwen,
            inputs,
            batch.completion_mask,
            space=space,
            config=config,
            generator=torch.Generator().manual_seed(7),
        )
    finally:
        handle.remove()
    assert grad_modes and not any(grad_modes)  # measured only, never differentiated

    # The clean measurement is the attack's: same objective, same band.
    entropy = entropy_attack(
        qwen, inputs, batch.completion_mask, space=space, config=AttackConfig(group_size=3)
    )
    assert result.entropy_before == pytest.approx(entropy.entropy_before, rel=1e-12)
    assert result.num_selected == entropy.num_selected
    band = naive_attack_objective(qwen, inputs, batch.completion_mask, group_size=3)[1]
    with torch.no_grad():
        after, _ = naive_attack_objective(
            qwen,
            {**inputs, "pixel_values": result.pixel_values},
            batch.completion_mask,
            band_mask=band,
        )
    assert result.entropy_after == pytest.approx(float(after), rel=1e-12)

    clean = space.to_images(inputs["pixel_values"], image_grid_thw=grid)
    adv = space.to_images(result.pixel_values, image_grid_thw=grid)
    # Temporal copies moved together: the pixel values are exactly those of their images.
    torch.testing.assert_close(
        space.from_images(adv, image_grid_thw=grid).double(),
        result.pixel_values,
        rtol=0,
        atol=1e-12,
    )
    signs = []
    for group in range(2):
        first = 3 * group
        for row in (first + 1, first + 2):
            assert torch.equal(
                result.pixel_values[_rows(grid, row)], result.pixel_values[_rows(grid, first)]
            )
        delta = adv[first].double() - clean[first].double()
        # Every pixel moved by exactly alpha, up or down, unless the [0, 1] clip stopped it.
        up = (delta - ALPHA).abs() < 1e-9
        down = (delta + ALPHA).abs() < 1e-9
        clipped_up = (clean[first] + ALPHA > 1) & (adv[first] - 1).abs().lt(1e-9)
        clipped_down = (clean[first] - ALPHA < 0) & adv[first].abs().lt(1e-9)
        assert bool((up | down | clipped_up | clipped_down).all())
        assert 0.45 < float(up.double().mean() + clipped_up.double().mean()) < 0.55
        signs.append(torch.where(up | clipped_up, 1, -1))
    # Two groups, two independent draws (both images have a 28-pixel top half to compare).
    assert not torch.equal(signs[0][:, :28, :28], signs[1][:, :28, :28])

    again = entropy_attack(
        qwen,
        inputs,
        batch.completion_mask,
        space=space,
        config=config,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(again.pixel_values, result.pixel_values)  # reproducible from the seed
    other = entropy_attack(
        qwen,
        inputs,
        batch.completion_mask,
        space=space,
        config=config,
        generator=torch.Generator().manual_seed(8),
    )
    assert not torch.equal(other.pixel_values, result.pixel_values)


def test_random_perturbation_respects_eps_over_several_steps(qwen, processor, space):
    batch = _batch(qwen, processor, seed=2)
    grid = batch.inputs["image_grid_thw"]
    config = AttackConfig(alpha=2 / 255, steps=3, eps=3 / 255, group_size=3, perturbation="random")
    result = entropy_attack(
        qwen,
        batch.inputs,
        batch.completion_mask,
        space=space,
        config=config,
        generator=torch.Generator().manual_seed(0),
    )
    clean = space.to_images(batch.inputs["pixel_values"], image_grid_thw=grid)
    adv = space.to_images(result.pixel_values, image_grid_thw=grid)
    largest = max(float((a - c).abs().max()) for a, c in zip(adv, clean, strict=True))
    assert 3 / 255 - 1e-9 <= largest <= 3 / 255 + 1e-9
    assert result.entropy_after is None and result.group_entropy_after is None


def test_perturbation_and_generator_are_checked():
    with pytest.raises(ValueError, match=r"perturbation must be one of \('entropy', 'random'\)"):
        AttackConfig(perturbation="gaussian")
    model = tiny_qwen2_5_vl()
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator, got int"):
        entropy_attack(model, {}, torch.zeros(1), space=None, generator=3)


# ---- per-group statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("perturbation", ["entropy", "random"])
def test_group_statistics_are_each_groups_own_objective(qwen, processor, space, perturbation):
    batch = _batch(qwen, processor, seed=3, groups=3, group_size=2)
    config = AttackConfig(alpha=ALPHA, group_size=2, measure_after=True, perturbation=perturbation)
    result = entropy_attack(
        qwen,
        batch.inputs,
        batch.completion_mask,
        space=space,
        config=config,
        generator=torch.Generator().manual_seed(1),
    )
    layout = RowLayout(qwen, batch.inputs, space, space.image_batch_fields(batch.inputs))
    adv_inputs = {**batch.inputs, "pixel_values": result.pixel_values}
    assert result.group_entropy_before.shape == (3,)
    assert result.group_entropy_before.dtype == torch.float64
    for group in range(3):
        rows = slice(2 * group, 2 * group + 2)
        clean = layout.rows(batch.inputs, rows.start, rows.stop)
        mask = batch.completion_mask[rows]
        with torch.no_grad():
            before, band = naive_attack_objective(qwen, clean, mask, group_size=2)
            after, _ = naive_attack_objective(
                qwen, layout.rows(adv_inputs, rows.start, rows.stop), mask, band_mask=band
            )
        assert float(result.group_entropy_before[group]) == pytest.approx(float(before), rel=1e-12)
        assert float(result.group_entropy_after[group]) == pytest.approx(float(after), rel=1e-12)
    # Every row has a selected token here, so the objective is the mean of the groups'.
    assert result.entropy_before == pytest.approx(float(result.group_entropy_before.mean()))


# ---- dropout: the attack runs in eval mode -------------------------------------------------------


def _with_dropout(model, p=0.5):
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return model.train()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_is_off_during_the_attack_and_mode_is_restored(
    qwen, processor, space, checkpointing
):
    model = _with_dropout(tiny_qwen2_5_vl(dtype=torch.float64))  # the weights of `qwen`
    if checkpointing:
        switch_checkpointing(model, True, {"use_reentrant": False})
    batch = _batch(model, processor, seed=4)
    modes = {name: m.training for name, m in model.named_modules()}
    config = AttackConfig(group_size=3, micro_batch_size=3)
    # Dropout really acts on this model in train mode: two forwards differ.
    with torch.no_grad():
        first, second = (model(**batch.inputs).logits for _ in range(2))
    assert not torch.equal(first, second)

    got = pixel_gradient(model, batch.inputs, batch.completion_mask, space=space, config=config)
    want = pixel_gradient(qwen, batch.inputs, batch.completion_mask, space=space, config=config)
    assert torch.equal(got.band_mask, want.band_mask)
    assert got.objective == pytest.approx(want.objective, rel=1e-12)
    scale = float(want.grad.abs().max())
    torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-10 * scale)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_mode_is_restored_when_the_attack_fails(processor, space):
    model = _with_dropout(tiny_qwen2_5_vl())
    model.model.visual.eval()  # a mixed state must come back as it was
    batch = _batch(model, processor, seed=5)
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []

    def fail(module, *args):
        seen.append(module.training)
        raise RuntimeError("boom")

    handle = model.model.language_model.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            entropy_attack(
                model, batch.inputs, batch.completion_mask, space=space, config=AttackConfig()
            )
    finally:
        handle.remove()
    assert seen == [False]  # eval mode inside
    assert {name: m.training for name, m in model.named_modules()} == modes


# ---- a float32 head over a bf16 model (TRL's cast_lm_head_to_fp32) -------------------------------


def test_float32_head_over_a_bfloat16_model(processor, space):
    model = tiny_qwen2_5_vl(dtype=torch.bfloat16)
    model.lm_head.float()
    # What TRL's cast_lm_head_to_fp32 does to the head's forward, for the naive oracle.
    head = model.lm_head
    head.forward = lambda hidden: torch.nn.functional.linear(hidden.float(), head.weight)
    batch = _batch(model, processor, seed=6)
    config = AttackConfig(group_size=3)
    ours = pixel_gradient(model, batch.inputs, batch.completion_mask, space=space, config=config)
    pixel_values = batch.inputs["pixel_values"].detach().clone().requires_grad_(True)
    objective, band = naive_attack_objective(
        model, {**batch.inputs, "pixel_values": pixel_values}, batch.completion_mask, group_size=3
    )
    (naive,) = torch.autograd.grad(objective, pixel_values)
    assert ours.grad.dtype == torch.float32 and pixel_values.dtype == torch.bfloat16
    assert torch.equal(ours.band_mask, band)
    # Same bf16 body, same fp32 head: only the entropy arithmetic differs (fp32 both ways).
    assert ours.objective == pytest.approx(float(objective.detach()), rel=1e-5)
    torch.testing.assert_close(
        ours.grad, naive.float(), rtol=0, atol=1e-2 * float(naive.abs().max())
    )


# ---- LoRA (peft) ---------------------------------------------------------------------------------


def test_lora_wrapped_model_attacks_like_its_merged_weights(qwen, processor, space):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        copy.deepcopy(qwen),
        peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, lora_dropout=0.5
        ),
    )
    lora.train()
    adapters = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" in n}
    flags = {n: p.requires_grad for n, p in lora.named_parameters()}
    assert adapters and any(flags.values())
    merged = copy.deepcopy(lora).merge_and_unload().eval()

    batch = _batch(qwen, processor, seed=7)
    config = AttackConfig(alpha=ALPHA, group_size=3, measure_after=True)
    got = entropy_attack(lora, batch.inputs, batch.completion_mask, space=space, config=config)
    want = entropy_attack(merged, batch.inputs, batch.completion_mask, space=space, config=config)
    # The adapters changed the model (so the test can fail) ...
    plain = entropy_attack(qwen, batch.inputs, batch.completion_mask, space=space, config=config)
    assert plain.entropy_before != pytest.approx(want.entropy_before, rel=1e-6)
    # ... and the wrapped model, dropout off, attacks exactly as its merged weights do.
    assert got.entropy_before == pytest.approx(want.entropy_before, rel=1e-10)
    assert got.entropy_after == pytest.approx(want.entropy_after, rel=1e-10)
    assert torch.equal(got.pixel_values, want.pixel_values)
    for name, value in adapters.items():
        assert torch.equal(dict(lora.named_parameters())[name], value), name
    assert {n: p.requires_grad for n, p in lora.named_parameters()} == flags
    assert lora.training
