"""The CPU path of entropy / log-probs: compiled (Inductor) and eager, against float64 truth.

Both implementations run every value test (``SAEI_CPU_COMPILE=1`` / ``0``), so neither can
drift; the compiled one must also compile once per dtype and vocabulary class, not per shape.
"""

from __future__ import annotations

import pytest
import torch

from saei_fast.ops import logprobs_and_entropy
from saei_fast.ops.entropy import compiled as _torch_fused
from saei_fast.ops.entropy import torch_path as _torch_entropy
from saei_fast.reference import logprobs_and_entropy_reference

MODES = ["1", "0"]  # compiled, eager


@pytest.fixture(params=MODES, ids=["compiled", "eager"])
def cpu_mode(request, monkeypatch):
    monkeypatch.setenv("SAEI_CPU_COMPILE", request.param)
    return request.param


def _logits(n, v, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _check_against_float64(logits, labels, mask, temperature, grad_tol):
    """Values and gradients of ``sum(g_H * H + g_lp * logp)`` against float64 autograd on the
    same (possibly rounded) logits."""
    gen = torch.Generator().manual_seed(7)
    g_h = torch.rand(logits.shape[:-1], generator=gen)
    g_lp = torch.rand(logits.shape[:-1], generator=gen)
    leaf = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(leaf, labels, temperature=temperature, mask=mask)
    (g_h * ent + g_lp * logp).sum().backward()
    ref_leaf = logits.double().requires_grad_(True)
    ref_logp, ref_ent = logprobs_and_entropy_reference(
        ref_leaf, labels, temperature=temperature, mask=mask
    )
    (g_h.double() * ref_ent + g_lp.double() * ref_logp).sum().backward()
    assert ent.dtype == logp.dtype == torch.float32
    torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=2e-5, rtol=1e-5)
    assert leaf.grad.dtype == logits.dtype
    scale = ref_leaf.grad.abs().max().item()
    err = (leaf.grad.double() - ref_leaf.grad).abs().max().item()
    assert err <= grad_tol * scale, (err, scale)
    if mask is not None:
        assert torch.all(leaf.grad[~mask] == 0)
        assert torch.all(ent[~mask] == 0) and torch.all(logp[~mask] == 0)


# V = 2053 (prime, below the cascade-summation size), 5003 and 32000 (above it); N not a
# multiple of any vector width.
@pytest.mark.parametrize("n,v", [(7, 2053), (5, 5003), (3, 32000)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_against_float64(cpu_mode, n, v, temperature):
    logits = _logits(n, v, seed=n * v)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(n, dtype=torch.bool)
    mask[1] = False
    _check_against_float64(logits, labels, None, temperature, grad_tol=1e-5)
    _check_against_float64(logits, labels, mask, temperature, grad_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_against_float64_on_the_same_inputs(cpu_mode, dtype):
    # The truth is float64 on the rounded inputs: the op must keep fp32-level error, and
    # its gradient is rounded once to the input dtype (one ulp of it).
    logits = _logits(6, 5003, dtype, seed=3)
    labels = torch.randint(0, 5003, (6,), generator=torch.Generator().manual_seed(2))
    grad_tol = torch.finfo(dtype).eps
    _check_against_float64(logits, labels, None, 1.3, grad_tol=grad_tol)


def test_special_values(cpu_mode):
    logits = _logits(5, 4099, seed=4)
    logits[0, ::3] = float("-inf")  # a masked vocabulary
    logits[1] = 1000.0 + logits[1]  # large: no cancellation
    logits[2] = float("nan")  # a masked row may hold anything
    logits[3] = float("-inf")  # excluded by its zero upstream gradient below
    labels = torch.tensor([1, 5, 0, 0, 4098])
    mask = torch.tensor([True, True, False, True, True])
    leaf = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(leaf, labels, mask=mask)
    assert torch.isnan(ent[3])  # an unmasked all -inf row has no distribution
    keep = torch.tensor([True, True, False, False, True])
    ref_logp, ref_ent = logprobs_and_entropy_reference(
        logits.double().masked_fill(torch.isneginf(logits), -1e4), labels, mask=keep
    )
    torch.testing.assert_close(ent[keep].double(), ref_ent[keep], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logp[keep].double(), ref_logp[keep], atol=2e-5, rtol=1e-5)
    assert ent[2] == 0 and logp[2] == 0
    # Row 3 is left out of the loss: zero upstream gradient means zero contribution, even
    # though its forward is NaN.
    torch.where(keep, ent + logp, 0.0).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert torch.all(leaf.grad[2:4] == 0)


def test_out_of_range_label_gives_nan_not_an_indexing_error(cpu_mode):
    logits = _logits(4, 4099, seed=5)
    labels = torch.tensor([0, 4099, -1, 7])
    ent, logp, _ = _torch_entropy.entropy_forward(logits, labels, None, 1.0)
    assert torch.isnan(logp[1:3]).all() and torch.isfinite(logp[[0, 3]]).all()
    grad = _torch_entropy.entropy_backward(
        logits, labels, None, ent, _, torch.ones(4), torch.ones(4), 1.0
    )
    assert torch.isfinite(grad).all()


def test_out_of_range_label_under_torch_compile_fullgraph():
    logits = _logits(3, 8, seed=6)
    labels = torch.tensor([0, 8, 3])  # 8 is outside the vocabulary: the check is skipped
    fn = torch.compile(lambda x: logprobs_and_entropy(x, labels, impl="torch")[0], fullgraph=True)
    logp = fn(logits)
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()


def test_non_contiguous_rows(cpu_mode):
    base = _logits(4 * 9, 4200, seed=8).view(4, 9, 4200)
    for name, view in {
        "row-strided": base.view(36, 4200)[:, :4150],
        "shifted": base[:, :-1],  # does not flatten: the eager path serves it
    }.items():
        labels = torch.randint(0, view.shape[-1], view.shape[:-1])
        leaf = view.detach().requires_grad_(True)
        logp, ent = logprobs_and_entropy(leaf, labels, temperature=0.9)
        (ent.sum() - logp.sum()).backward()
        ref = view.detach().double().requires_grad_(True)
        ref_logp, ref_ent = logprobs_and_entropy_reference(ref, labels, temperature=0.9)
        (ref_ent.sum() - ref_logp.sum()).backward()
        torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=1e-7, rtol=1e-4, msg=name)


def test_compiled_once_per_dtype_and_vocabulary_class(monkeypatch):
    monkeypatch.setenv("SAEI_CPU_COMPILE", "1")
    before = _torch_fused.compile_counts()
    for n, v, temperature in [(5, 5003, 1.0), (9, 6007, 0.7), (33, 5120, 1.3), (2, 5003, 2.0)]:
        leaf = _logits(n, v, seed=n).requires_grad_(True)
        labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(n))
        mask = torch.arange(n) % 3 != 1
        logp, ent = logprobs_and_entropy(leaf, labels, temperature=temperature, mask=mask)
        (ent + logp).sum().backward()
        with torch.no_grad():
            logprobs_and_entropy(leaf[:, : v - 3], labels % (v - 3), temperature=temperature)
    after = _torch_fused.compile_counts()
    # Four shapes, three temperatures, masked or not, contiguous or row-strided: at most one
    # compilation per key in the whole process (a strided entry also serves contiguous rows,
    # so a key compiled earlier may stay unused).
    assert all(count == 1 for count in after.values()), after
    new = {key: count - before.get(key, 0) for key, count in after.items()}
    assert sum(new.values()) <= 3, new
    kinds = {key[0] for key in after if key[1:3] == ("float32", "V>4096")}
    assert kinds == {"forward", "backward"}, after


def test_the_switch(monkeypatch):
    monkeypatch.setenv("SAEI_CPU_COMPILE", "0")
    assert not _torch_fused.usable(_logits(4, 5003))
    monkeypatch.setenv("SAEI_CPU_COMPILE", "1")
    assert _torch_fused.usable(_logits(4, 5003))
    assert not _torch_fused.usable(_logits(4, 5003, torch.float64))  # float64: exact eager
    assert not _torch_fused.usable(_logits(1, 5003))  # one row: Dynamo would specialise
    monkeypatch.setenv("SAEI_CPU_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="SAEI_CPU_COMPILE"):
        _torch_fused.usable(_logits(4, 5003))


def test_compiler_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(kind):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(_torch_fused, "_compiled", broken)
    monkeypatch.setattr(_torch_fused, "_BROKEN", [])
    logits = _logits(4, 5003, seed=9)
    monkeypatch.setenv("SAEI_CPU_COMPILE", "1")
    with pytest.raises(RuntimeError, match="SAEI_CPU_COMPILE=1"):
        _torch_entropy.entropy_forward(logits, None, None, 1.0)
    monkeypatch.setenv("SAEI_CPU_COMPILE", "auto")
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        ent, _, _ = _torch_entropy.entropy_forward(logits, None, None, 1.0)
    truth = logprobs_and_entropy_reference(logits.double(), torch.zeros(4, dtype=torch.long))[1]
    torch.testing.assert_close(ent.double(), truth, atol=2e-5, rtol=1e-5)
    assert not _torch_fused.usable(logits)  # eager from then on, without another warning


def test_rows_functions_keep_the_linear_op_contract(cpu_mode):
    """The linear op calls rows_forward / rows_backward per chunk, labels in range or None."""
    x = _logits(6, 5003, seed=10)
    labels = torch.randint(0, 5003, (6,), generator=torch.Generator().manual_seed(3))
    ent, logp, stats = _torch_entropy.rows_forward(x.clone(), labels, 1 / 0.8)
    ref_logp, ref_ent = logprobs_and_entropy_reference(x.double(), labels, temperature=0.8)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-5, rtol=1e-5)
    assert _torch_entropy.rows_forward(x.clone(), None, 1.0)[1] is None
    g_h = torch.rand(6, generator=torch.Generator().manual_seed(4))
    g_h[2] = 0.0  # a row with no upstream gradient
    grad = _torch_entropy.rows_backward(x.clone(), stats, ent, g_h, None, None, 1 / 0.8)
    leaf = x.double().requires_grad_(True)
    (
        g_h.double() * logprobs_and_entropy_reference(leaf, labels, temperature=0.8)[1]
    ).sum().backward()
    torch.testing.assert_close(grad.double(), leaf.grad, atol=1e-7, rtol=1e-4)
    assert torch.all(grad[2] == 0)
