"""entropy_attack with settings other than the defaults (a sampling temperature other than 1,
a band other than the middle third), against the naive full-logits objective with the same
settings.

The attack tests elsewhere run at temperature 1 and with the middle third, where an attack
that ignored ``config.temperature`` or ``config.band`` gives the right gradient; trainers
sample at 0.6 to 1.0, and the paper's ablations select the low or the high tokens.
"""

from __future__ import annotations

import pytest
import torch

from saei_fast import AttackConfig, entropy_attack, pixels
from saei_fast.attack import pixel_gradient
from saei_fast.reference import naive_attack_objective
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_attack_at_temperature_matches_naive_objective(micro_batch_size):
    model = tiny_qwen2_5_vl(dtype=torch.float64)
    processor = tiny_qwen_image_processor(max_side=56)
    space = pixels.from_processor(processor)
    images = random_images(2, (28, 28), seed=9)
    batch = vlm_batch(model, processor, images, group_size=2, seed=9)
    results = {}
    for temperature in (0.6, 1.0):
        config = AttackConfig(
            group_size=2, temperature=temperature, micro_batch_size=micro_batch_size
        )
        ours = pixel_gradient(
            model, batch.inputs, batch.completion_mask, space=space, config=config
        )
        pixel_values = batch.inputs["pixel_values"].detach().clone().requires_grad_(True)
        objective, band_mask = naive_attack_objective(
            model,
            {**batch.inputs, "pixel_values": pixel_values},
            batch.completion_mask,
            group_size=2,
            temperature=temperature,
        )
        (naive,) = torch.autograd.grad(objective, pixel_values)
        assert torch.equal(ours.band_mask, band_mask)
        assert ours.objective == pytest.approx(float(objective.detach()), rel=1e-12)
        scale = float(naive.abs().max())
        torch.testing.assert_close(ours.grad, naive, rtol=0, atol=1e-5 * scale)
        results[temperature] = ours
    # The temperature matters: another objective and another gradient at 0.6 than at 1.
    assert results[0.6].objective != pytest.approx(results[1.0].objective, rel=1e-3)
    assert not torch.allclose(results[0.6].grad, results[1.0].grad)

    # The whole attack at 0.6: its before / after objectives are the naive ones at 0.6.
    config = AttackConfig(group_size=2, temperature=0.6, measure_after=True, alpha=4 / 255)
    result = entropy_attack(model, batch.inputs, batch.completion_mask, space=space, config=config)
    assert result.entropy_before == pytest.approx(results[0.6].objective, rel=1e-12)
    after, _ = naive_attack_objective(
        model,
        {**batch.inputs, "pixel_values": result.pixel_values},
        batch.completion_mask,
        group_size=2,
        temperature=0.6,
        band_mask=results[0.6].band_mask,
    )
    assert result.entropy_after == pytest.approx(float(after.detach()), rel=1e-9)


@pytest.mark.parametrize(
    "band", [(0.0, 0.5), (0.25, 1.0)], ids=["lower-half", "upper-three-quarters"]
)
@pytest.mark.parametrize("scope", ["group", "batch"])
def test_attack_band_other_than_the_middle_third(band, scope):
    """The band is a setting (the paper's ablations select the low or the high tokens): the
    attack's band mask, objective and gradient are the naive ones for that band, and differ
    from the middle third's."""
    model = tiny_qwen2_5_vl(dtype=torch.float64)
    processor = tiny_qwen_image_processor(max_side=56)
    space = pixels.from_processor(processor)
    batch = vlm_batch(model, processor, random_images(2, (28, 28), seed=10), group_size=2, seed=10)
    config = AttackConfig(group_size=2, band=band, scope=scope)
    ours = pixel_gradient(model, batch.inputs, batch.completion_mask, space=space, config=config)
    pixel_values = batch.inputs["pixel_values"].detach().clone().requires_grad_(True)
    objective, band_mask = naive_attack_objective(
        model,
        {**batch.inputs, "pixel_values": pixel_values},
        batch.completion_mask,
        band=band,
        scope=scope,
        group_size=2,
    )
    (naive,) = torch.autograd.grad(objective, pixel_values)
    assert torch.equal(ours.band_mask, band_mask)
    assert ours.objective == pytest.approx(float(objective.detach()), rel=1e-12)
    torch.testing.assert_close(ours.grad, naive, rtol=0, atol=1e-5 * float(naive.abs().max()))
    middle = pixel_gradient(
        model, batch.inputs, batch.completion_mask, space=space,
        config=AttackConfig(group_size=2, scope=scope),
    )  # fmt: skip
    assert not torch.equal(middle.band_mask, ours.band_mask)
