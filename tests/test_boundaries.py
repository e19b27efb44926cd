"""The exact boundary of every validated numeric setting of the ops, the attack and the pixel
spaces, on both sides: the last refused value raises, the first accepted one runs and gives
the value the float64 reference gives there.

The error tests elsewhere try one clearly valid and one clearly invalid value; an off-by-one
in a refusal (``< 1`` written ``< 2``, ``> 0`` written ``>= 0``, ``lo <= hi`` for ``lo < hi``)
passes them. Here each setting's limit is met exactly: 0 and the smallest positive double
for "> 0", 0 and 1 for ">= 1", ``nextafter`` of the band edges, a group size equal to the
row count and one more, the smallest temperature whose inverse is finite in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_helpers import DEVICE, INTERPRETER_WARNINGS

import saei_fast
from saei_fast import AttackConfig, entropy_attack, pixels
from saei_fast.ops.linear_entropy.op import (
    _linear_logprobs_and_entropy_variant as linear_logprobs_and_entropy_impl,
)
from saei_fast.pixels import ImageSpace
from saei_fast.reference import (
    entropy_band_mask_reference,
    entropy_reference,
    group_advantages_reference,
    naive_attack_objective,
)
from saei_fast.rollout import adversarial_row_mask, saei_rollout
from saei_fast.tools.testing import (
    random_images,
    tiny_qwen2_5_vl,
    tiny_qwen_image_processor,
    vlm_batch,
)

pytestmark = INTERPRETER_WARNINGS

TINY = 5e-324  # the smallest positive double
ONE_UP = math.nextafter(1.0, 2.0)
# float32 rounds 1/T to +inf from 2**128 - 2**103 up (half an ulp above its largest value):
# the smallest temperature the ops take is the inverse of that, to the double.
T_MIN = 1.0 / (2.0**128 - 2.0**103)
T_ACCEPTED = T_MIN * (1 + 1e-12)
T_REFUSED = T_MIN * (1 - 1e-12)


# ---- AttackConfig ----------------------------------------------------------------------------


# (field, last refused value, first accepted value)
ATTACK_BOUNDARIES = [
    ("alpha", 0.0, TINY),
    ("alpha", math.inf, 1.7976931348623157e308),
    ("steps", 0, 1),
    ("eps", 0.0, TINY),
    ("eps", math.inf, 1.7976931348623157e308),
    ("band", (-TINY, 0.5), (0.0, 0.5)),
    ("band", (0.5, ONE_UP), (0.5, 1.0)),
    ("band", (0.5, 0.5), (math.nextafter(0.5, 0.0), 0.5)),
    ("group_size", 0, 1),
    ("temperature", 0.0, T_ACCEPTED),
    ("temperature", T_REFUSED, T_ACCEPTED),
    ("temperature", math.inf, 1.7976931348623157e308),
    ("micro_batch_size", 0, 1),
]


@pytest.mark.parametrize(
    "field,refused,accepted", ATTACK_BOUNDARIES, ids=[f"{f}={r}" for f, r, _ in ATTACK_BOUNDARIES]
)
def test_attack_config_boundaries(field, refused, accepted):
    with pytest.raises(ValueError, match=field):
        AttackConfig(**{field: refused})
    config = AttackConfig(**{field: accepted})
    assert getattr(config, field) == accepted


@pytest.mark.parametrize("field", ["steps", "group_size", "micro_batch_size"])
def test_attack_config_counts_refuse_bools_and_floats_at_one(field):
    """``True`` and ``1.0`` equal 1 but are not counts."""
    for value in (True, 1.0):
        with pytest.raises(TypeError, match=field):
            AttackConfig(**{field: value})


# ---- temperature on the ops ------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_smallest_temperature_runs_and_one_below_is_refused(impl):
    """At the smallest accepted temperature ``1/T`` is float32's largest value: the ops run
    and give the float64 entropy (a near one-hot distribution here, logits kept small so
    that ``z / T`` itself stays finite); just below it they refuse before any work."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.rand(3, 37, generator=gen) * 0.4 - 0.2
    got = saei_fast.ops.entropy(logits.to(DEVICE), temperature=T_ACCEPTED, impl=impl)
    truth = entropy_reference(logits.double(), temperature=T_ACCEPTED)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu().double(), truth, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        saei_fast.ops.entropy(logits.to(DEVICE), temperature=T_REFUSED, impl=impl)
    with pytest.raises(ValueError, match="temperature"):
        saei_fast.ops.entropy(logits.to(DEVICE), temperature=0.0, impl=impl)


# ---- chunk_rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_rows_one_is_the_first_accepted(impl):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=gen).to(DEVICE)
    weight = torch.randn(11, 8, generator=gen).to(DEVICE)
    labels = torch.randint(0, 11, (5,), generator=gen).to(DEVICE)
    for bad in (0, True):
        with pytest.raises(ValueError, match="chunk_rows"):
            linear_logprobs_and_entropy_impl(hidden, weight, labels, impl=impl, chunk_rows=bad)
        with pytest.raises(ValueError, match="chunk_rows"):
            saei_fast.linear_token_loss(
                hidden, weight, labels, lambda lp, h, i: -lp, impl=impl, chunk_rows=bad
            )
    logprobs, entropy = linear_logprobs_and_entropy_impl(
        hidden, weight, labels, impl=impl, chunk_rows=1
    )
    logits = hidden.double() @ weight.double().T
    torch.testing.assert_close(entropy.double(), entropy_reference(logits), atol=2e-5, rtol=0)
    want = logits.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), want, atol=2e-5, rtol=0)
    loss = saei_fast.linear_token_loss(
        hidden, weight, labels, lambda lp, h, i: -lp, impl=impl, chunk_rows=1
    )
    torch.testing.assert_close(loss.double(), -want.sum(), atol=1e-4, rtol=0)


# ---- band mask: group_size and the band edges ------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_band_mask_group_size_boundaries(impl):
    """Groups of one are the sequence scope; one group of every row is the batch scope;
    one row more than the batch (or one that does not divide it) is refused."""
    gen = torch.Generator().manual_seed(2)
    entropy = torch.rand(6, 9, generator=gen)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 1, 0, 7, 2])[:, None]
    run = {"impl": impl}

    def band(**kwargs):
        return saei_fast.entropy_band_mask(entropy.to(DEVICE), mask.to(DEVICE), **kwargs, **run)

    ones = band(scope="group", group_size=1).cpu()
    assert torch.equal(ones, entropy_band_mask_reference(entropy, mask, scope="sequence"))
    whole = band(scope="group", group_size=6).cpu()
    assert torch.equal(whole, entropy_band_mask_reference(entropy, mask, scope="batch"))
    for bad in (0, 4, 7):
        with pytest.raises(ValueError, match="group_size"):
            band(scope="group", group_size=bad)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_band_edges_are_inclusive_and_one_ulp_beyond_is_refused(impl):
    """``(0, 1)`` selects every valid token; ``lo = -tiny`` and ``hi = 1 + ulp`` are
    refused; ``lo`` one ulp under ``hi`` is a band (that selects nothing here)."""
    gen = torch.Generator().manual_seed(3)
    entropy = torch.rand(3, 8, generator=gen).to(DEVICE)
    mask = (torch.arange(8)[None, :] < torch.tensor([8, 3, 1])[:, None]).to(DEVICE)
    everything = saei_fast.entropy_band_mask(entropy, mask, band=(0.0, 1.0), impl=impl)
    assert torch.equal(everything, mask)
    narrow = saei_fast.entropy_band_mask(
        entropy, mask, band=(math.nextafter(0.5, 0.0), 0.5), impl=impl
    )
    assert torch.equal(
        narrow.cpu(),
        entropy_band_mask_reference(entropy.cpu(), mask.cpu(), band=(math.nextafter(0.5, 0), 0.5)),
    )
    for band in ((-TINY, 1.0), (0.0, ONE_UP), (0.5, 0.5)):
        with pytest.raises(ValueError, match="band"):
            saei_fast.entropy_band_mask(entropy, mask, band=band, impl=impl)


# ---- group advantages ------------------------------------------------------------------------


def test_group_advantages_boundaries():
    """``group_size`` 1 (every advantage 0) and ``B`` (one group) are accepted, 0 and
    ``B + 1`` refused; ``eps = 0`` is accepted (a constant group still gives 0, not NaN)
    and the first negative value refused."""
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.25, 1.0])
    torch.testing.assert_close(
        saei_fast.group_advantages(rewards, 1), torch.zeros(6), rtol=0, atol=0
    )
    whole = saei_fast.group_advantages(rewards, 6)
    torch.testing.assert_close(whole.double(), group_advantages_reference(rewards, 6))
    for bad in (0, 7, 4):
        with pytest.raises(ValueError, match="group_size"):
            saei_fast.group_advantages(rewards, bad)
    no_eps = saei_fast.group_advantages(rewards, 2, eps=0.0)
    torch.testing.assert_close(no_eps.double(), group_advantages_reference(rewards, 2, eps=0.0))
    assert no_eps[2:4].eq(0).all()  # the constant group
    with pytest.raises(ValueError, match="eps"):
        saei_fast.group_advantages(rewards, 2, eps=-TINY)


# ---- pixel spaces ----------------------------------------------------------------------------


def _image_batch(seed=4):
    gen = torch.Generator().manual_seed(seed)
    space = ImageSpace(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    images = [torch.rand(3, 4, 5, generator=gen) for _ in range(2)]
    pixel_values = space.from_images(images)
    grad = torch.randn(pixel_values.shape, generator=gen)
    return space, images, pixel_values, grad


def test_pixel_step_alpha_boundaries():
    """``alpha = 0`` is refused; the smallest positive alpha moves nothing a float32 pixel
    can show; ``alpha = 1`` (the whole range) sends every pixel with a nonzero gradient to
    the edge its gradient points to, after projection."""
    space, images, pixel_values, grad = _image_batch()
    with pytest.raises(ValueError, match="alpha"):
        space.step(pixel_values, grad, 0.0)
    assert torch.equal(space.step(pixel_values, grad, TINY), pixel_values)
    full = space.project(space.step(pixel_values, grad, 1.0), pixel_values)
    got = torch.stack(space.to_images(full))
    want = (torch.stack(images) + grad.sign()).clamp(0, 1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_pixel_projection_eps_boundaries():
    """``eps = 0`` is refused; the smallest positive eps projects back onto the clean image
    (to float32); ``eps`` equal to the step keeps the step whole, a smaller one clips it."""
    space, images, pixel_values, grad = _image_batch(seed=5)
    step = space.step(pixel_values, grad, 0.1)
    with pytest.raises(ValueError, match="eps"):
        space.project(step, pixel_values, eps=0.0)
    back = space.project(step, pixel_values, eps=TINY)
    torch.testing.assert_close(back, pixel_values, atol=1e-6, rtol=0)
    clean = torch.stack(images)
    moved = torch.stack(space.to_images(space.project(step, pixel_values, eps=0.1)))
    inside = ((clean + 0.1 * grad.sign()) >= 0) & ((clean + 0.1 * grad.sign()) <= 1)
    change = (moved - clean).abs()
    torch.testing.assert_close(
        change[inside], torch.full_like(change[inside], 0.1), atol=1e-6, rtol=0
    )
    smaller = torch.stack(space.to_images(space.project(step, pixel_values, eps=0.05)))
    assert (smaller - clean).abs().max() <= 0.05 + 1e-6


def test_pixel_space_std_boundary():
    with pytest.raises(ValueError, match="std"):
        ImageSpace(mean=0.5, std=0.0)
    space = ImageSpace(mean=0.5, std=TINY * 2**60)  # tiny but positive: accepted
    assert space.std[0] > 0


# ---- rollout counts --------------------------------------------------------------------------


def test_rollout_counts_boundaries():
    """``n_clean``, ``n_adv`` and ``num_groups`` 0 are refused, 1 accepted: one clean and
    one adversarial row per prompt, laid out clean first."""
    for name in ("num_groups", "n_clean", "n_adv"):
        counts = {"num_groups": 1, "n_clean": 1, "n_adv": 1, name: 0}
        with pytest.raises(ValueError, match=name):
            adversarial_row_mask(**counts)
    assert adversarial_row_mask(1, 1, 1).tolist() == [False, True]

    def generate(prompts, images, copies):
        return [f"{p}/{i}" for p, i in zip(prompts, images, strict=True)]

    def attack(prompts, images, completions, group_size):
        return [f"adv({image})" for image in images[::group_size]]

    for name in ("n_clean", "n_adv"):
        counts = {"n_clean": 1, "n_adv": 1, name: 0}
        with pytest.raises(ValueError, match=name):
            saei_rollout(["p"], ["i"], generate=generate, attack=attack, **counts)
    rollout = saei_rollout(
        ["p", "q"], ["i", "j"], n_clean=1, n_adv=1, generate=generate, attack=attack
    )
    assert rollout.completions == ["p/i", "p/adv(i)", "q/j", "q/adv(j)"]
    assert rollout.is_adversarial.tolist() == [False, True, False, True]


# ---- the attack: group_size and micro_batch_size against the batch ---------------------------


@pytest.fixture(scope="module")
def qwen_setup():
    model = tiny_qwen2_5_vl(dtype=torch.float64)
    processor = tiny_qwen_image_processor(max_side=56)
    return model, processor, pixels.from_processor(processor)


@pytest.mark.usefixtures("one_thread")
def test_attack_group_size_equal_to_the_batch_and_one_more(qwen_setup):
    """One group spanning the whole batch is accepted (every row gets the image, the
    objective is the naive one); a group one row larger than the batch is refused; a
    micro-batch larger than the batch is one pass, the same pixels as none."""
    model, processor, space = qwen_setup
    batch = vlm_batch(model, processor, random_images(1, (28, 28), seed=6), group_size=3)
    run = {"space": space}
    config = AttackConfig(group_size=3, alpha=4 / 255)
    result = entropy_attack(model, batch.inputs, batch.completion_mask, config=config, **run)
    objective, _ = naive_attack_objective(
        model, batch.inputs, batch.completion_mask, group_size=3, scope="group"
    )
    assert result.entropy_before == pytest.approx(float(objective.detach()), rel=1e-6)
    assert result.group_entropy_before.shape == (1,)
    blocks = result.pixel_values.split(len(result.pixel_values) // 3)
    assert all(torch.equal(blocks[0], block) for block in blocks)
    larger = AttackConfig(group_size=3, alpha=4 / 255, micro_batch_size=4)
    same = entropy_attack(model, batch.inputs, batch.completion_mask, config=larger, **run)
    assert torch.equal(same.pixel_values, result.pixel_values)
    with pytest.raises(ValueError, match="group_size=4 must divide the batch size 3"):
        entropy_attack(
            model, batch.inputs, batch.completion_mask, config=AttackConfig(group_size=4), **run
        )


@pytest.mark.usefixtures("one_thread")
def test_attack_on_a_batch_of_one_row(qwen_setup):
    """A batch of one row, one group of one: the objective is the row's band mean."""
    model, processor, space = qwen_setup
    batch = vlm_batch(model, processor, random_images(1, (28, 56), seed=7), group_size=1)
    result = entropy_attack(
        model, batch.inputs, batch.completion_mask, space=space, config=AttackConfig()
    )
    objective, band_mask = naive_attack_objective(model, batch.inputs, batch.completion_mask)
    assert result.entropy_before == pytest.approx(float(objective.detach()), rel=1e-6)
    assert result.num_selected == int(band_mask.sum()) > 0
