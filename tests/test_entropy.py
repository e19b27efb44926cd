"""Entropy and label log-probs from logits, on both implementations, against float64 truth.

Every value test runs on the PyTorch path and on the Triton kernels (in Triton's CPU
interpreter when there is no GPU), so the two cannot drift apart.
"""

from __future__ import annotations

import math

import pytest
import torch

import saei_fast
from saei_fast.ops import entropy, logprobs_and_entropy
from saei_fast.reference import (
    entropy_reference,
    logprobs_and_entropy_reference,
    naive_logprobs_and_entropy,
)

# Triton's CPU interpreter evaluates both sides of tl.where in numpy and warns about the
# side that is discarded (0 * inf, log 0).
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", "triton"]
# Allowed excess over naive PyTorch's own error in the same dtype (the accuracy rule).
EXTRA_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _logits(n: int, v: int, dtype=torch.float32, scale: float = 3.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)


def _close(ours: torch.Tensor, truth: torch.Tensor, msg: str = "") -> None:
    """float32 results against float64 truth: a few fp32 ulps of the value, or 2e-5 near 0."""
    torch.testing.assert_close(ours.double(), truth.double(), atol=2e-5, rtol=1e-5, msg=msg)


def _finite_inf(logits: torch.Tensor) -> torch.Tensor:
    # exp(-1e4) is exactly 0 in float64, so this is the same distribution with a reference
    # gradient free of 0 * inf.
    return logits.double().masked_fill(torch.isneginf(logits), -1e4)


# Shapes: V = 1 (degenerate: H = 0), 2 and 7 (tiny, below any block), 2053 (prime, crosses
# block edges), 32000 (a real vocabulary size, several blocks per row).
SHAPES = [(5, 1), (3, 2), (9, 7), (6, 2053), (2, 32000)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_accuracy_no_worse_than_naive(impl, n, v, dtype, temperature):
    logits = _logits(n, v, dtype, seed=n * v)
    labels = torch.randint(0, v, (n,), device=DEVICE)
    logp, ent = logprobs_and_entropy(logits, labels, temperature=temperature, impl=impl)
    true_logp, true_ent = logprobs_and_entropy_reference(logits, labels, temperature=temperature)
    naive_logp, naive_ent = naive_logprobs_and_entropy(logits, labels, temperature=temperature)
    assert ent.dtype == torch.float32 and logp.dtype == torch.float32
    for ours, naive, truth in ((ent, naive_ent, true_ent), (logp, naive_logp, true_logp)):
        our_err = (ours.double() - truth).abs().max().item()
        naive_err = (naive.double() - truth).abs().max().item()
        assert our_err <= naive_err + EXTRA_TOL[dtype], (our_err, naive_err)


def _special_rows(v: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(v)
    rows = torch.randn(6, v, generator=gen, dtype=torch.float64)
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
@pytest.mark.parametrize("v", [1, 2, 7, 2053])
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
def test_masks_with_empty_rows_and_all_masked(impl):
    logits = _logits(4 * 5, 37, seed=3).view(4, 5, 37).requires_grad_(True)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    mask = mask.to(DEVICE)
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
    for name, view in views.items():
        labels = torch.randint(0, view.shape[-1], view.shape[:-1], device=DEVICE)
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
    empty = torch.empty(0, 4, 13, device=DEVICE)
    assert entropy(empty, impl=impl).shape == (0, 4)
    labels = torch.empty(0, 4, dtype=torch.long, device=DEVICE)
    logp, ent = logprobs_and_entropy(empty.requires_grad_(True), labels, impl=impl)
    (logp.sum() + ent.sum()).backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_labels_and_masked_ignore_index(impl):
    logits = _logits(6, 50, seed=11)
    labels = torch.randint(0, 50, (6,), device=DEVICE, dtype=torch.int32)
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    labels[~mask] = -100  # padding labels are never read
    logp, _ = logprobs_and_entropy(logits, labels, mask=mask, impl=impl)
    true_logp, _ = logprobs_and_entropy_reference(logits, labels, mask=mask)
    _close(logp, true_logp)


def test_gradcheck_float64():
    logits = _logits(5, 9, torch.float64, seed=5).requires_grad_(True)
    labels = torch.randint(0, 9, (5,), device=DEVICE)
    mask = torch.tensor([True, True, False, True, True], device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda x: entropy(x, temperature=0.8, mask=mask, impl="torch"), (logits,)
    )
    assert torch.autograd.gradcheck(
        lambda x: logprobs_and_entropy(x, labels, temperature=1.7, mask=mask, impl="torch"),
        (logits,),
    )


@pytest.mark.parametrize("block_v", [16, 64])
def test_kernel_blocks_smaller_than_vocab(block_v):
    """The online max / sum-exp merge across many blocks, and the partial last block."""
    from saei_fast.kernels.entropy_logits import entropy_bwd, entropy_fwd, lse_from_stats

    logits = torch.cat([_logits(4, 203, seed=2), _special_rows(203).float().to(DEVICE)])
    labels = torch.tensor([0, 202, 101, 7, 48, 150, 3, 48, 5, 1], device=DEVICE)
    ent, logp, stats = entropy_fwd(logits, labels, None, 1 / 0.7, block_v=block_v)
    true_logp, true_ent = logprobs_and_entropy_reference(logits, labels, temperature=0.7)
    _close(ent, true_ent)
    finite = torch.isfinite(true_logp)
    torch.testing.assert_close(logp.double()[finite], true_logp[finite], atol=2e-5, rtol=1e-5)
    lse = lse_from_stats(stats, 1 / 0.7)
    _close(lse, torch.logsumexp(logits.double() / 0.7, -1))

    grad_h = torch.rand(10, device=DEVICE)
    # A label on a -inf logit has log p = -inf; leave it out of the loss, as the reference must.
    grad_lp = torch.rand(10, device=DEVICE) * finite
    grad = entropy_bwd(logits, labels, None, ent, stats, grad_h, grad_lp, 1 / 0.7, block_v=block_v)
    leaf = _finite_inf(logits).requires_grad_(True)
    ref_logp, ref_ent = logprobs_and_entropy_reference(leaf, labels, temperature=0.7)
    (
        grad_h.double() * ref_ent + grad_lp.double() * ref_logp.masked_fill(~finite, 0)
    ).sum().backward()
    torch.testing.assert_close(grad.double(), leaf.grad, atol=2e-6, rtol=1e-4)

    # In place: the gradient may overwrite the logits it is computed from.
    in_place = logits.clone()
    entropy_bwd(in_place, labels, None, ent, stats, grad_h, grad_lp, 1 / 0.7, out=in_place)
    torch.testing.assert_close(in_place, grad)


def test_implementations_agree_on_bf16_gradients():
    logits = _logits(7, 1031, torch.bfloat16, seed=9)
    labels = torch.randint(0, 1031, (7,), device=DEVICE)
    grads = []
    for impl in IMPLS:
        leaf = logits.clone().requires_grad_(True)
        logp, ent = logprobs_and_entropy(leaf, labels, temperature=1.3, impl=impl)
        (ent.sum() + logp.sum()).backward()
        assert leaf.grad.dtype == torch.bfloat16
        grads.append(leaf.grad.float())
    # Both compute in fp32 and round once to bf16: at most one bf16 ulp apart.
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=8e-3)


def test_out_of_range_label_is_nan_in_kernel():
    """Under torch.compile the host range check is skipped: the kernel must not make up a
    number for a label outside the vocabulary."""
    from saei_fast.kernels.entropy_logits import entropy_fwd

    logits = _logits(3, 10)
    labels = torch.tensor([0, 10, -1], device=DEVICE)
    _, logp, _ = entropy_fwd(logits, labels, None, 1.0)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()


def test_top_level_exports_are_the_ops():
    assert saei_fast.entropy is entropy
    assert saei_fast.logprobs_and_entropy is logprobs_and_entropy


def test_torch_compile_fullgraph():
    logits = _logits(2 * 6, 97, seed=4).view(2, 6, 97)
    labels = torch.randint(0, 97, (2, 6), device=DEVICE)
    mask = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.3

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
