"""saei_fast.rollout: SaEI's clean / adversarial group layout and GRPO group advantages."""

from __future__ import annotations

import pytest
import torch

import saei_fast
from saei_fast.reference import group_advantages_reference
from saei_fast.rollout import adversarial_row_mask, saei_rollout

# ---- group_advantages -----------------------------------------------------------------------


# Group sizes: 1 (degenerate, always 0), 2 (smallest with a std), 3 and 7 (odd), 12 (the
# paper's 6 clean + 6 adversarial).
@pytest.mark.parametrize("group_size", [1, 2, 3, 7, 12])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_advantages_match_float64_reference(group_size, scale, dtype):
    generator = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(5 * group_size, generator=generator, dtype=torch.float64).to(dtype)
    # Binary rewards too: the common case, with ties and constant groups.
    binary = (torch.rand(5 * group_size, generator=generator) > 0.5).to(dtype)
    for values in (rewards, binary):
        got = saei_fast.group_advantages(values, group_size, scale=scale)
        want = group_advantages_reference(values, group_size, scale=scale)
        assert got.dtype == dtype and got.shape == values.shape
        tolerance = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)


def test_group_advantages_eps_and_known_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    # Group 1: mean 1/3, std sqrt(1/3); group 2: mean 5/3, std sqrt(1/3).
    std = (1 / 3) ** 0.5
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]) / (std + 0.5)
    got = saei_fast.group_advantages(rewards, 3, eps=0.5)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        saei_fast.group_advantages(rewards, 3, scale=False),
        torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]),
    )
    # eps = 0 is allowed: constant groups never divide.
    torch.testing.assert_close(
        saei_fast.group_advantages(rewards, 3, eps=0), expected * (std + 0.5) / std
    )


def test_constant_group_gets_exactly_zero():
    # 0.1 * 3 rounds, so mean(0.1, 0.1, 0.1) != 0.1 in float32: r - mean is ~1e-9, and
    # dividing that by eps=1e-6 would give ~1e-3 instead of 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0, 0.5])
    got = saei_fast.group_advantages(rewards, 3)
    assert torch.equal(got[:6], torch.zeros(6))
    # (0, 1, 0.5): mean 0.5, std 0.5.
    torch.testing.assert_close(got[6:], torch.tensor([-1.0, 1.0, 0.0]), atol=1e-5, rtol=0)


def test_group_advantages_reject_bad_arguments():
    rewards = torch.zeros(6)
    with pytest.raises(TypeError, match=r"rewards must be a torch\.Tensor"):
        saei_fast.group_advantages([0.0, 1.0], 2)
    with pytest.raises(TypeError, match="rewards must be float16"):
        saei_fast.group_advantages(torch.zeros(6, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[B\], got shape \(2, 3\)"):
        saei_fast.group_advantages(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="group_size=4 must divide the number of rewards 6"):
        saei_fast.group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        saei_fast.group_advantages(rewards, 0)
    with pytest.raises(TypeError, match="group_size must be an int, got bool"):
        saei_fast.group_advantages(rewards, True)
    with pytest.raises(TypeError, match="scale must be a bool, got int"):
        saei_fast.group_advantages(rewards, 2, scale=1)
    with pytest.raises(ValueError, match=r"eps must be finite and >= 0, got -1\.0"):
        saei_fast.group_advantages(rewards, 2, eps=-1.0)
    with pytest.raises(ValueError, match="rewards must be finite, got nan"):
        saei_fast.group_advantages(torch.tensor([0.0, float("nan")]), 2)
    for bad in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match=r"rewards must be finite, got -?inf at index 1"):
            saei_fast.group_advantages(torch.tensor([1.0, bad, 0.0, 1.0]), 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_advantages_of_half_precision_rewards_compute_in_float32(dtype):
    # fp16 holds +-60000, but their sum of squares (the std) overflows it: in fp16 the
    # advantages would come out 0 (or NaN). bf16 has the range but only 8 bits of mantissa.
    rewards = torch.tensor([60000.0, -60000.0, 30000.0, 1.0, 2.0, 4.0], dtype=dtype)
    got = saei_fast.group_advantages(rewards, 3)
    want = group_advantages_reference(rewards, 3)
    assert got.dtype == dtype
    assert bool(torch.isfinite(got).all()) and bool((got != 0).all())
    # One rounding to the output dtype on top of the float32 arithmetic.
    torch.testing.assert_close(
        got.double(), want, rtol=2**-8 if dtype == torch.bfloat16 else 2**-11, atol=0
    )


# ---- saei_rollout -----------------------------------------------------------------------------


class Recorder:
    """A fake model: completions name the (prompt, image) they came from; the attack maps an
    image to "adv(image)"; every call is recorded."""

    def __init__(self) -> None:
        self.calls = []

    def generate(self, prompts, images, copies):
        self.calls.append(("generate", list(prompts), list(images), copies))
        return [f"{p}|{i}|{n}" for n, (p, i) in enumerate(zip(prompts, images, strict=True))]

    def attack(self, prompts, images, completions, group_size):
        self.calls.append(("attack", list(prompts), list(images), list(completions), group_size))
        return [f"adv({image})" for image in images[::group_size]]


def test_rollout_generates_clean_then_attacks_then_adversarial():
    fake = Recorder()
    rollout = saei_rollout(
        ["p0", "p1"], ["i0", "i1"], n_clean=2, n_adv=3, generate=fake.generate, attack=fake.attack
    )
    (gen1, attack, gen2) = fake.calls
    assert gen1 == ("generate", ["p0", "p0", "p1", "p1"], ["i0", "i0", "i1", "i1"], 2)
    # The attack sees exactly the clean rows and their completions, grouped by prompt.
    assert attack[1:3] == (["p0", "p0", "p1", "p1"], ["i0", "i0", "i1", "i1"])
    assert attack[3] == ["p0|i0|0", "p0|i0|1", "p1|i1|2", "p1|i1|3"] and attack[4] == 2
    assert gen2 == ("generate", ["p0"] * 3 + ["p1"] * 3, ["adv(i0)"] * 3 + ["adv(i1)"] * 3, 3)

    # Rows of a prompt are contiguous, clean first.
    assert rollout.prompts == ["p0"] * 5 + ["p1"] * 5
    assert rollout.completions == [
        "p0|i0|0", "p0|i0|1", "p0|adv(i0)|0", "p0|adv(i0)|1", "p0|adv(i0)|2",
        "p1|i1|2", "p1|i1|3", "p1|adv(i1)|3", "p1|adv(i1)|4", "p1|adv(i1)|5",
    ]  # fmt: skip
    assert rollout.generation_images == ["i0"] * 2 + ["adv(i0)"] * 3 + ["i1"] * 2 + ["adv(i1)"] * 3
    assert rollout.loss_images == ["i0"] * 5 + ["i1"] * 5  # always the clean image
    assert rollout.is_adversarial.tolist() == [False] * 2 + [True] * 3 + [False] * 2 + [True] * 3
    assert rollout.adversarial_images == ["adv(i0)", "adv(i1)"]
    assert (rollout.n_clean, rollout.n_adv, rollout.group_size) == (2, 3, 5)
    assert rollout.attack_seconds >= 0.0


def test_adversarial_row_mask():
    assert adversarial_row_mask(2, 3, 1).tolist() == [False, False, False, True] * 2
    with pytest.raises(ValueError, match="n_adv must be >= 1, got 0"):
        adversarial_row_mask(2, 3, 0)


def test_rollout_rejects_bad_arguments_before_generating():
    fake = Recorder()
    kwargs = {"generate": fake.generate, "attack": fake.attack}
    with pytest.raises(ValueError, match="n_clean must be >= 1, got 0"):
        saei_rollout(["p"], ["i"], n_clean=0, n_adv=1, **kwargs)
    with pytest.raises(TypeError, match="n_adv must be an int, got float"):
        saei_rollout(["p"], ["i"], n_clean=1, n_adv=1.0, **kwargs)
    with pytest.raises(ValueError, match=r"one clean image per prompt \(2\), got 1"):
        saei_rollout(["p", "q"], ["i"], n_clean=1, n_adv=1, **kwargs)
    with pytest.raises(ValueError, match="at least one prompt"):
        saei_rollout([], [], n_clean=1, n_adv=1, **kwargs)
    with pytest.raises(TypeError, match="attack must be callable, got NoneType"):
        saei_rollout(["p"], ["i"], n_clean=1, n_adv=1, generate=fake.generate, attack=None)
    assert fake.calls == []


def test_rollout_rejects_callables_that_return_the_wrong_count():
    fake = Recorder()
    short = lambda prompts, images, copies: ["x"] * (len(prompts) - 1)
    with pytest.raises(ValueError, match="generate must return 4 items, got 3"):
        saei_rollout(["p", "q"], ["i", "j"], n_clean=2, n_adv=1, generate=short, attack=fake.attack)
    one_image = lambda prompts, images, completions, group_size: ["a"]
    with pytest.raises(ValueError, match="attack must return 2 items, got 1"):
        saei_rollout(
            ["p", "q"], ["i", "j"], n_clean=2, n_adv=1, generate=fake.generate, attack=one_image
        )
