"""The TMA variant of the fused linear-entropy forward (``kernels/linear_entropy/tma.py``).

Run under ``TRITON_INTERPRET=1`` (host tensor descriptors are interpreted as masked loads
with TMA's zero fill), checked against float64 truth (``saei_fast.reference``) in fp32 and
fp16 (the interpreter computes ``tl.dot`` on bf16 operands wrongly), and against the default
forward, whose numerics it must keep. Then its selection (``SAEI_LINEAR_TMA``), its refusal
off sm_90, and its benchmark plans. The compiled sm_90 code is checked in
``test_kernel_report_tma.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from saei_fast.kernels.linear_entropy import plans as linear_plans
from saei_fast.kernels.linear_entropy import tma as linear_entropy_tma
from saei_fast.kernels.plan import TARGETS
from saei_fast.ops.linear_entropy import triton_path as linear_entropy
from saei_fast.ops.linear_entropy.op import (
    _linear_logprobs_and_entropy_variant as linear_logprobs_and_entropy_impl,
)
from saei_fast.reference import (
    linear_logprobs_and_entropy_reference,
    naive_linear_logprobs_and_entropy,
)

pytestmark = [
    pytest.mark.triton,
    # NumPy warns where the kernels compute values they then discard: exp(d) * d for the
    # -inf columns past V (replaced by 0) and log(0), 0 / 0 in the merge's lanes past the
    # last row (not stored).
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

if torch.cuda.is_available():  # on a GPU the kernel needs sm_90; elsewhere the interpreter
    DEVICE = "cuda"
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA forward runs on sm_90 only", allow_module_level=True)
else:
    DEVICE = "cpu"
# Allowed excess over naive PyTorch's own error in the same dtype (the accuracy rule of
# tests/test_linear_entropy.py).
EXTRA_TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
# 16-wide tiles keep the interpreter fast and put many tile edges in small shapes.
BLOCKS = (16, 16, 16)


def _inputs(n, d, v, dtype, seed):
    """hidden, weight, bias, labels with logits of standard deviation ~2."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (2 / math.sqrt(d))
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    return *(t.to(DEVICE, dtype) for t in (hidden, weight, bias)), labels.to(DEVICE)


def _check_accuracy(ours, truth, naive, dtype):
    """fp32: within 2e-5 (+1e-5 relative) of float64; fp16: no worse than naive PyTorch in
    fp16 plus the dtype's allowance."""
    ours, truth = ours.double(), truth.double()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, truth, atol=2e-5, rtol=1e-5)
    else:
        err = (ours - truth).abs().max().item()
        naive_err = (naive.double() - truth).abs().max().item()
        assert err <= naive_err + EXTRA_TOL[dtype], (err, naive_err)


# (N, D, V, labels, temperature, kept rows): V odd and not a multiple of the 16-wide tile;
# D = 40 and 24 not multiples of BLOCK_D (the last D step is zero-filled by TMA); one row
# (a row block that is almost all padding); a vocabulary over several tiles and splits.
CASES = [
    pytest.param(21, 40, 37, True, 0.8, 9, id="labels-T0.8-kept"),
    pytest.param(21, 40, 37, False, 1.3, 0, id="no-labels-T1.3"),
    pytest.param(1, 24, 131, True, 1.0, 1, id="one-row-kept"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("n", "d", "v", "with_labels", "temperature", "kept"), CASES)
def test_tma_forward_matches_float64(dtype, n, d, v, with_labels, temperature, kept):
    hidden, weight, bias, labels = _inputs(n, d, v, dtype, seed=n + d + v)
    labels = labels if with_labels else None
    assert linear_entropy_tma._describable(hidden)  # the hidden tile comes through TMA
    logits_out = torch.full((kept, v), float("nan"), device=DEVICE, dtype=dtype)
    ent, logp, stats = linear_entropy_tma.linear_entropy_tma_fwd(
        hidden, weight, bias, None, labels, 1 / temperature,
        logits_out=logits_out if kept else None, blocks=BLOCKS, num_splits=3,
    )  # fmt: skip

    truth_labels = labels if with_labels else torch.zeros(n, dtype=torch.long, device=DEVICE)
    true_logp, true_ent = linear_logprobs_and_entropy_reference(
        hidden, weight, truth_labels, bias=bias, temperature=temperature
    )
    naive_logp, naive_ent = naive_linear_logprobs_and_entropy(
        hidden, weight, truth_labels, bias=bias, temperature=temperature
    )
    logits = hidden.double() @ weight.double().t() + bias.double()
    naive_logits = (hidden @ weight.t() + bias).double()  # rounded to the input dtype
    _check_accuracy(ent, true_ent, naive_ent, dtype)
    # stats = (max logit, log sum exp((x - max) / T)): together they give the log-partition.
    lse = stats[:, 0].double() / temperature + stats[:, 1].double()
    true_lse = torch.logsumexp(logits / temperature, dim=-1)
    _check_accuracy(lse, true_lse, torch.logsumexp(naive_logits / temperature, dim=-1), dtype)
    if with_labels:
        _check_accuracy(logp, true_logp, naive_logp, dtype)
    else:
        assert logp is None
    if kept:
        # The kept logits are the float64 ones rounded to the input dtype: fp32 accumulation
        # may land one fp16 rounding step (2**-10 relative) away.
        rtol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(logits_out, logits[:kept].to(dtype), atol=1e-5, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tma_forward_keeps_the_default_forwards_numerics(dtype):
    """Same tiles, schedule and epilogue as the pointer kernel: the same results, gathered
    rows (pointer loads for hidden, TMA for the weight) and an out-of-range label included."""
    hidden, weight, bias, labels = _inputs(29, 40, 53, dtype, seed=5)
    labels[3] = 53  # another shard's label: NaN log-prob
    rows = torch.tensor([0, 3, 4, 7, 11, 12, 20, 28], device=DEVICE)
    args = (hidden, weight, bias, rows, labels, 1 / 0.7)
    ours = linear_entropy_tma.linear_entropy_tma_fwd(*args, blocks=BLOCKS, num_splits=2)
    default = linear_entropy.fused_forward(*args, blocks=BLOCKS, num_splits=2)
    for a, b in zip(ours, default, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, equal_nan=True)
    assert torch.isnan(ours[1][3]) and ours[0][1].item() == 0.0  # row 1 is not in ``rows``
    true_logp, true_ent = linear_logprobs_and_entropy_reference(
        hidden, weight, labels.clamp(max=52), bias=bias, temperature=0.7
    )
    naive_logp, naive_ent = naive_linear_logprobs_and_entropy(
        hidden, weight, labels.clamp(max=52), bias=bias, temperature=0.7
    )
    _check_accuracy(ours[0][rows], true_ent[rows], naive_ent[rows], dtype)
    kept = rows[rows != 3]
    _check_accuracy(ours[1][kept], true_logp[kept], naive_logp[kept], dtype)


def test_hidden_layout_tma_cannot_address_is_read_through_pointers():
    """A hidden view whose row stride is not 16-byte aligned (41 fp32) cannot be a TMA
    descriptor: its tile is loaded through pointers, the weight still through TMA."""
    base, weight, bias, labels = _inputs(13, 41, 37, torch.float32, seed=9)
    hidden = base[:, :40]
    assert not linear_entropy_tma._describable(hidden)
    ent, logp, _ = linear_entropy_tma.linear_entropy_tma_fwd(
        hidden, weight[:, :40].contiguous(), bias, None, labels, 1.0, blocks=BLOCKS
    )
    true_logp, true_ent = linear_logprobs_and_entropy_reference(
        hidden, weight[:, :40], labels, bias=bias
    )
    torch.testing.assert_close(ent.double(), true_ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logp.double(), true_logp, atol=2e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------
# Selection
# -------------------------------------------------------------------------------------------


@pytest.fixture
def tma_calls(monkeypatch):
    """Counts launches of the TMA forward."""
    calls = []
    launch = linear_entropy_tma.linear_entropy_tma_fwd

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(linear_entropy_tma, "linear_entropy_tma_fwd", counted)
    return calls


def test_env_switches_the_op_to_the_tma_forward(monkeypatch, tma_calls):
    """``SAEI_LINEAR_TMA=1``: the op's forward runs the TMA kernel, and values and gradients
    (the backward reads the forward's statistics and kept logits) match float64."""
    monkeypatch.setenv("SAEI_LINEAR_TMA", "1")
    hidden, weight, bias, labels = _inputs(19, 24, 37, torch.float32, seed=2)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, ent = linear_logprobs_and_entropy_impl(
        leaves[0], leaves[1], labels, bias=leaves[2], temperature=0.9, impl="triton"
    )
    (ent.sum() + logp.sum()).backward()
    assert tma_calls, "SAEI_LINEAR_TMA=1 did not launch the TMA forward"
    truth = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    true_logp, true_ent = linear_logprobs_and_entropy_reference(
        truth[0], truth[1], labels, bias=truth[2], temperature=0.9
    )
    (true_ent.sum() + true_logp.sum()).backward()
    torch.testing.assert_close(ent.double(), true_ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logp.double(), true_logp, atol=2e-5, rtol=1e-5)
    for ours, ref in zip(leaves, truth, strict=True):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("value", [None, "0", ""])
def test_default_forward_without_the_switch(monkeypatch, tma_calls, value):
    if value is None:
        monkeypatch.delenv("SAEI_LINEAR_TMA", raising=False)
    else:
        monkeypatch.setenv("SAEI_LINEAR_TMA", value)
    hidden, weight, bias, labels = _inputs(5, 24, 37, torch.float32, seed=3)
    linear_entropy.fused_forward(hidden, weight, bias, None, labels, 1.0, blocks=BLOCKS)
    assert not tma_calls


def test_weight_tma_cannot_address_gets_the_default_forward(monkeypatch, tma_calls):
    """Row stride 21 fp32 (84 bytes): the switch falls back to the default kernel for that
    call, and the TMA launcher itself refuses it with a ValueError naming ``weight``."""
    monkeypatch.setenv("SAEI_LINEAR_TMA", "1")
    hidden, weight, bias, labels = _inputs(5, 21, 37, torch.float32, seed=4)
    ent, _, _ = linear_entropy.fused_forward(hidden, weight, bias, None, labels, 1.0, blocks=BLOCKS)
    assert not tma_calls
    _, true_ent = linear_logprobs_and_entropy_reference(hidden, weight, labels, bias=bias)
    torch.testing.assert_close(ent.double(), true_ent, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"weight must be \[V, D\] .*strides \(21, 1\)"):
        linear_entropy_tma.linear_entropy_tma_fwd(hidden, weight, bias, None, labels, 1.0)


@pytest.mark.parametrize(
    ("capability", "refused"), [((9, 0), False), ((8, 0), True), ((10, 0), True)]
)
def test_switch_is_refused_off_sm_90(monkeypatch, capability, refused):
    """An explicit opt-in never silently times the default kernel: a CUDA device other than
    sm_90 (or a CPU without the interpreter) is a RuntimeError naming the variable."""
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if refused:
        arch = "sm_{}{}".format(*capability)
        with pytest.raises(RuntimeError, match=rf"SAEI_LINEAR_TMA=1 .*got {arch}"):
            linear_entropy_tma.check_tma_device(torch.device("cuda"))
    else:
        linear_entropy_tma.check_tma_device(torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="a cpu device"):
        linear_entropy_tma.check_tma_device(torch.device("cpu"))


# -------------------------------------------------------------------------------------------
# Benchmark plans
# -------------------------------------------------------------------------------------------


def test_tma_plans_for_sm_90_only():
    """sm_90: one ``forward-tma`` and one ``frozen-head-tma`` plan per benchmark N x D, typed
    for every kernel argument, with the default forward's persistent grid (>= 0.90 of the
    GPU busy); listed by ``linear_entropy.benchmark_plans``. None for sm_80 or AMD."""
    plans = linear_entropy_tma.tma_benchmark_plans(TARGETS["sm_90"])
    roles = [p.role for p in plans]
    assert roles.count("forward-tma") == roles.count("frozen-head-tma") == 10
    kernel = linear_entropy_tma._linear_entropy_tma_fwd_kernel
    default = {
        (p.shape["N"], p.shape["D"]): p
        for p in linear_plans.benchmark_plans(TARGETS["sm_90"])
        if p.role == "forward"
    }
    for plan in plans:
        assert set(plan.signature) | set(plan.constexprs) == set(kernel.arg_names)
        assert plan.signature["weight_desc"] == "tensordesc<bf16[128, 64]>"
        assert plan.extra["wave_efficiency"] >= 0.90, (plan.role, plan.shape)
        if plan.role == "forward-tma":
            twin = default[plan.shape["N"], plan.shape["D"]]
            assert (plan.grid, plan.bytes_moved, plan.flops) == (
                twin.grid,
                twin.bytes_moved,
                twin.flops,
            )
    listed = {p.role for p in linear_plans.benchmark_plans(TARGETS["sm_90"])}
    assert {"forward-tma", "frozen-head-tma"} <= listed
    for name in ("sm_80", "gfx942", "gfx90a"):
        assert linear_entropy_tma.tma_benchmark_plans(TARGETS[name]) == []
        assert not any(p.role.endswith("-tma") for p in linear_plans.benchmark_plans(TARGETS[name]))
