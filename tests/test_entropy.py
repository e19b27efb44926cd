"""Entropy and label log-probs from logits, on both implementations, against float64 truth.

Every value test runs on the PyTorch path and on the Triton kernels (in Triton's CPU
interpreter when there is no GPU), so the two cannot drift apart. Every random draw comes
from a seeded generator, so a failure reproduces from the test's parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_helpers import DEVICE, IMPLS, INTERPRETER_WARNINGS

import saei_fast
from saei_fast.ops import entropy, logprobs_and_entropy
from saei_fast.reference import entropy_reference, logprobs_and_entropy_reference

pytestmark = INTERPRETER_WARNINGS


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(n: int, v: int, dtype=torch.float32, scale: float = 3.0, seed: int = 0):
    return (torch.randn(n, v, generator=_gen(seed), dtype=torch.float64) * scale).to(DEVICE, dtype)


def _labels(shape, v: int, seed: int, dtype=torch.long) -> torch.Tensor:
    return torch.randint(0, v, tuple(shape), generator=_gen(seed)).to(DEVICE, dtype)


def _uniform(shape, seed: int) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=_gen(seed)).to(DEVICE)


def _close(ours: torch.Tensor, truth: torch.Tensor, msg: str = "") -> None:
    """float32 results against float64 truth: a few fp32 ulps of the value, or 2e-5 near 0."""
    torch.testing.assert_close(ours.double(), truth.double(), atol=2e-5, rtol=1e-5, msg=msg)


def _finite_inf(logits: torch.Tensor) -> torch.Tensor:
    # exp(-1e4) is exactly 0 in float64, so this is the same distribution with a reference
    # gradient free of 0 * inf.
    return logits.double().masked_fill(torch.isneginf(logits), -1e4)


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at each value (subnormal spacing below the normals)."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(values.abs().clamp_min(info.tiny)))
    return torch.exp2(exponent) * info.eps


# Shapes: V = 1 (degenerate: H = 0), 2 and 7 (tiny, below any tile), 507 (odd, not a multiple
# of the 128-bit vector), 2053 (prime, crosses tile edges), 32000 (a real vocabulary size,
# several tiles per row, split over programs when there are few rows).
SHAPES = [(5, 1), (3, 2), (9, 7), (4, 507), (6, 2053), (2, 32000)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_fp32_level_error_for_every_input_dtype(impl, n, v, dtype, temperature):
    """Low-precision inputs are exact numbers: the truth is float64 on the same rounded
    logits, and accumulating in fp32 must reach fp32-level error whatever the input dtype
    (rounding the result to the input dtype would be off by ~1e-2)."""
    logits = _logits(n, v, dtype, seed=n * v)
    labels = _labels((n,), v, seed=v)
    logp, ent = logprobs_and_entropy(logits, labels, temperature=temperature, impl=impl)
    true_logp, true_ent = logprobs_and_entropy_reference(logits, labels, temperature=temperature)
    assert ent.dtype == torch.float32 and logp.dtype == torch.float32
    _close(ent, true_ent, msg="entropy")
    _close(logp, true_logp, msg="log-prob")


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_logits_stay_float64(impl):
    """float64 (gradient checks) is never narrowed to the kernels' fp32, even when Triton is
    requested: values and gradients to float64 precision."""
    logits = _logits(4, 37, torch.float64, seed=21).requires_grad_(True)
    labels = _labels((4,), 37, seed=22)
    logp, ent = logprobs_and_entropy(logits, labels, temperature=0.8, impl=impl)
    assert ent.dtype == torch.float64 and logp.dtype == torch.float64
    assert entropy(logits, impl=impl).dtype == torch.float64
    leaf = logits.detach().clone().requires_grad_(True)
    true_logp, true_ent = logprobs_and_entropy_reference(leaf, labels, temperature=0.8)
    torch.testing.assert_close(ent, true_ent, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logp, true_logp, atol=1e-12, rtol=1e-12)
    (ent.sum() + 0.5 * logp.sum()).backward()
    (true_ent.sum() + 0.5 * true_logp.sum()).backward()
    assert logits.grad.dtype == torch.float64
    torch.testing.assert_close(logits.grad, leaf.grad, atol=1e-12, rtol=1e-10)


def _special_rows(v: int) -> torch.Tensor:
    rows = torch.randn(6, v, generator=_gen(v), dtype=torch.float64)
    rows[0] = 0.0
    rows[0, v // 2] = 60.0  # peaked: almost all mass on one token, H ~ 0
    rows[1] = 0.0  # uniform: H = log V
    rows[2] = -1000.0 - rows[2].abs()  # all large negative: exp underflows without a shift
    rows[3, ::3] = float("-inf")  # masked vocabulary: must not produce NaN
    rows[4] = rows[4] * 40  # very spread logits
    rows[5] = 1000.0 + rows[5]  # large positive: lse - E[z] would cancel badly
    if v == 1:
        rows[3] = 0.5  # a single -inf entry would make the whole row -inf
    return rows


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [1, 2, 7, 507, 2053])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_special_rows_forward_and_backward(impl, v, temperature):
    rows = _special_rows(v).to(DEVICE, torch.float32)
    labels = torch.arange(6, device=DEVICE) % v
    labels[3] = 0  # on a -inf entry (when v > 1): log p = -inf, not NaN
    mask = torch.tensor([True, True, True, True, True, False], device=DEVICE)

    leaf = rows.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(leaf, labels, temperature=temperature, mask=mask, impl=impl)
    true_logp, true_ent = logprobs_and_entropy_reference(
        rows, labels, temperature=temperature, mask=mask
    )
    assert not torch.isnan(ent).any() and not torch.isnan(logp).any()
    _close(ent, true_ent)
    finite = torch.isfinite(true_logp)
    torch.testing.assert_close(logp.double()[finite], true_logp[finite], atol=2e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(logp), torch.isneginf(true_logp))
    if v == 1:
        assert torch.all(ent == 0)
    else:
        assert ent[1].item() == pytest.approx(math.log(v), abs=1e-5)

    weight_h = torch.linspace(0.5, 1.5, 6, device=DEVICE)
    (weight_h * ent + 0.3 * logp.masked_fill(~torch.isfinite(logp), 0)).sum().backward()
    ref_leaf = _finite_inf(rows).requires_grad_(True)
    ref_logp, ref_ent = logprobs_and_entropy_reference(
        ref_leaf, labels, temperature=temperature, mask=mask
    )
    (weight_h.double() * ref_ent + 0.3 * ref_logp.masked_fill(~finite, 0)).sum().backward()
    assert not torch.isnan(leaf.grad).any()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=2e-6, rtol=1e-4)
    assert torch.all(leaf.grad[5] == 0)  # masked row: exactly zero


@pytest.mark.parametrize("impl", IMPLS)
def test_finite_logits_near_float32_max(impl):
    """Finite logits of opposite sign near +-3e38, far apart in the row (several kernel
    tiles): their differences overflow fp32 to -inf, which must count as probability 0,
    never as 0 * -inf = NaN."""
    v = 5000
    rows = torch.full((3, v), -2e38, dtype=torch.float64)
    # The maxima come after whole tiles of huge negative logits, so the running maximum
    # jumps by ~4e38 (or ~6e38) and so does every rescaling exponent.
    rows[0, 4500] = 2e38  # one token holds all the mass: H = 0
    rows[1] = -3e38
    rows[1, [2500, 4500]] = 3e38  # two equal maxima in different tiles: H = ln 2
    rows[2] = torch.randn(v, generator=_gen(51), dtype=torch.float64) * 3
    rows[2, 0] = -3.4e38  # one huge negative logit before the ordinary ones
    logits = rows.to(DEVICE, torch.float32)
    labels = torch.tensor([4500, 2500, 7], device=DEVICE)
    leaf = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(leaf, labels, temperature=0.7, impl=impl)
    true_logp, true_ent = logprobs_and_entropy_reference(logits, labels, temperature=0.7)
    _close(ent, true_ent)
    _close(logp, true_logp)
    assert ent[0].item() == 0.0 and ent[1].item() == pytest.approx(math.log(2), abs=1e-6)
    ent.sum().backward()
    ref_leaf = logits.double().requires_grad_(True)
    entropy_reference(ref_leaf, temperature=0.7).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_row_of_only_neg_inf_gives_nan_unless_masked(impl):
    logits = _logits(3, 11)
    logits[1] = float("-inf")
    labels = torch.zeros(3, dtype=torch.long, device=DEVICE)
    logp, ent = logprobs_and_entropy(logits, labels, impl=impl)
    assert torch.isnan(ent[1]) and torch.isnan(logp[1])
    assert torch.isfinite(ent[[0, 2]]).all()
    mask = torch.tensor([True, False, True], device=DEVICE)
    logp, ent = logprobs_and_entropy(logits, labels, mask=mask, impl=impl)
    assert ent[1].item() == 0.0 and logp[1].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_row_with_zero_upstream_gradient_gets_zero_gradient(impl):
    """A position whose upstream gradients are all zero is treated as masked in the
    backward: an unmasked all -inf row (NaN entropy) left out of the loss with torch.where
    gives exactly 0 gradient, and every other row its true gradient."""
    logits = _logits(4, 23, seed=31)
    logits[2] = float("-inf")
    labels = _labels((4,), 23, seed=32)
    leaf = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(leaf, labels, temperature=0.9, impl=impl)
    keep = torch.isfinite(ent) & torch.isfinite(logp)
    assert keep.tolist() == [True, True, False, True]
    zero = torch.zeros((), device=DEVICE)
    (torch.where(keep, ent, zero) + torch.where(keep, logp, zero)).sum().backward()
    assert torch.all(leaf.grad[2] == 0)
    ref_leaf = logits[keep].double().requires_grad_(True)
    ref_logp, ref_ent = logprobs_and_entropy_reference(ref_leaf, labels[keep], temperature=0.9)
    (ref_ent + ref_logp).sum().backward()
    torch.testing.assert_close(leaf.grad[keep].double(), ref_leaf.grad, atol=2e-6, rtol=1e-4)

    # Entropy alone: its gradient is 0 for the row, so no NaN reaches the logits either.
    leaf.grad = None
    ent = entropy(leaf, impl=impl)
    torch.where(torch.isfinite(ent), ent, zero).sum().backward()
    assert torch.all(leaf.grad[2] == 0) and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_are_never_read(impl):
    """NaN logits in masked rows would poison any row that read them."""
    logits = _logits(5, 300, seed=41)
    mask = torch.tensor([True, False, True, False, True], device=DEVICE)
    logits[~mask] = float("nan")
    labels = _labels((5,), 300, seed=42)
    leaf = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(leaf, labels, mask=mask, impl=impl)
    assert torch.all(ent[~mask] == 0) and torch.all(logp[~mask] == 0)
    _close(ent[mask], entropy_reference(logits[mask]))
    (ent.sum() + logp.sum()).backward()
    assert torch.all(leaf.grad[~mask] == 0) and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_masks_with_empty_rows_and_all_masked(impl):
    logits = _logits(4 * 5, 37, seed=3).view(4, 5, 37).requires_grad_(True)
    mask = (_uniform((4, 5), seed=1) > 0.4).to(DEVICE)
    mask[2] = False  # a sequence with no valid token
    ent = entropy(logits, mask=mask, impl=impl)
    _close(ent, entropy_reference(logits.detach(), mask=mask))
    ent.sum().backward()
    assert torch.all(logits.grad[~mask] == 0)

    none = torch.zeros(4, 5, dtype=torch.bool, device=DEVICE)
    logits.grad = None
    ent = entropy(logits, mask=none, impl=impl)
    assert torch.all(ent == 0)
    ent.sum().backward()
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_views(impl):
    base = _logits(3 * 8, 2 * 131, seed=7).view(3, 8, 2 * 131)
    views = {
        "shifted": base[:, :-1, :131],  # logits[:, :-1] as trainers slice them
        "transposed": base[:, :, :131].transpose(0, 1),
        "strided_vocab": base[:, :, ::2],
        "four_dims": base[:, :, :130].reshape(3, 2, 4, 130)[:, :, 1:],
    }
    for seed, (name, view) in enumerate(views.items()):
        labels = _labels(view.shape[:-1], view.shape[-1], seed=seed)
        leaf = view.detach().clone().requires_grad_(True)
        strided_leaf = view.detach().requires_grad_(True)  # still non-contiguous
        logp, ent = logprobs_and_entropy(strided_leaf, labels, temperature=0.9, impl=impl)
        true_logp, true_ent = logprobs_and_entropy_reference(leaf, labels, temperature=0.9)
        _close(ent, true_ent.detach(), msg=name)
        _close(logp, true_logp.detach(), msg=name)
        (ent.sum() - logp.sum()).backward()
        (true_ent.sum() - true_logp.sum()).backward()
        torch.testing.assert_close(strided_leaf.grad, leaf.grad, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_shapes(impl):
    single = _logits(1, 13).view(13)
    assert entropy(single, impl=impl).shape == ()
    _close(entropy(single, impl=impl), entropy_reference(single))
    one_token = _logits(3, 29, seed=5).view(3, 1, 29)  # [B, 1, V]: one-token completions
    _close(
        entropy(one_token, temperature=1.7, impl=impl),
        entropy_reference(one_token, temperature=1.7),
    )
    empty = torch.empty(0, 4, 13, device=DEVICE)
    assert entropy(empty, impl=impl).shape == (0, 4)
    labels = torch.empty(0, 4, dtype=torch.long, device=DEVICE)
    logp, ent = logprobs_and_entropy(empty.requires_grad_(True), labels, impl=impl)
    (logp.sum() + ent.sum()).backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_labels_and_masked_ignore_index(impl):
    logits = _logits(6, 50, seed=11)
    labels = _labels((6,), 50, seed=12, dtype=torch.int32)
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    labels[~mask] = -100  # padding labels are never read
    logp, _ = logprobs_and_entropy(logits, labels, mask=mask, impl=impl)
    true_logp, _ = logprobs_and_entropy_reference(logits, labels, mask=mask)
    _close(logp, true_logp)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_within_one_ulp_of_float64(impl, dtype):
    """Both paths compute the gradient in fp32 and round it once to the logits' dtype: every
    entry within one ulp of float64 autograd on the same rounded logits."""
    logits = _logits(7, 1031, dtype, seed=9)
    labels = _labels((7,), 1031, seed=10)
    weights = _uniform((2, 7), seed=11) + 0.5
    leaf = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(leaf, labels, temperature=1.3, impl=impl)
    (weights[0] * ent + weights[1] * logp).sum().backward()
    assert leaf.grad.dtype == dtype
    ref_leaf = logits.double().requires_grad_(True)
    ref_logp, ref_ent = logprobs_and_entropy_reference(ref_leaf, labels, temperature=1.3)
    (weights[0].double() * ref_ent + weights[1].double() * ref_logp).sum().backward()
    truth = ref_leaf.grad
    ulp = _ulp(truth, dtype)
    error = (leaf.grad.double() - truth).abs()
    assert torch.all(error <= ulp), (error / ulp).max().item()


def test_gradcheck_float64():
    logits = _logits(5, 9, torch.float64, seed=5).requires_grad_(True)
    labels = _labels((5,), 9, seed=6)
    mask = torch.tensor([True, True, False, True, True], device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda x: entropy(x, temperature=0.8, mask=mask, impl="torch"), (logits,)
    )
    assert torch.autograd.gradcheck(
        lambda x: logprobs_and_entropy(x, labels, temperature=1.7, mask=mask, impl="torch"),
        (logits,),
    )


def test_top_level_exports_are_the_ops():
    assert saei_fast.entropy is entropy
    assert saei_fast.logprobs_and_entropy is logprobs_and_entropy


def test_torch_compile_fullgraph():
    logits = _logits(2 * 6, 97, seed=4).view(2, 6, 97)
    labels = _labels((2, 6), 97, seed=5)
    mask = _uniform((2, 6), seed=0) > 0.3

    def loss_fn(x):
        logp, ent = saei_fast.logprobs_and_entropy(x, labels, temperature=0.7, mask=mask)
        return (ent * 0.5 - logp).sum() + saei_fast.entropy(x, mask=mask).mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_leaf = logits.clone().requires_grad_(True)
    compiled_leaf = logits.clone().requires_grad_(True)
    eager = loss_fn(eager_leaf)
    eager.backward()
    result = compiled(compiled_leaf)
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)
