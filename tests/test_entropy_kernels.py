"""The entropy-from-logits kernels themselves: tiles and vocabulary ranges smaller than the
row (so that small vocabularies cross every edge the real shapes cross), the launch
configuration, and the launch plans the compile-time report compiles.

Values are checked against float64 truth; the kernels run in Triton's CPU interpreter when
there is no GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_helpers import DEVICE, INTERPRETER_WARNINGS

from saei_fast.kernels.entropy.config import entropy_config
from saei_fast.kernels.entropy.launch import entropy_bwd, entropy_fwd, lse_from_stats
from saei_fast.kernels.entropy.plans import BENCHMARK_SHAPES, benchmark_plans
from saei_fast.kernels.plan import TARGETS
from saei_fast.reference import entropy_reference, logprobs_and_entropy_reference

pytestmark = INTERPRETER_WARNINGS


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(ours: torch.Tensor, truth: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(ours.double(), truth.double(), atol=2e-5, rtol=1e-5, msg=msg)


def _rows(v: int, seed: int) -> torch.Tensor:
    """Random rows, then rows that stress the online statistics across tiles: the maximum in
    the last tile (every earlier lane rescaled), a masked vocabulary, large logits, and the
    first tile entirely -inf (lanes with no finite maximum yet)."""
    rows = torch.randn(8, v, generator=_gen(seed), dtype=torch.float64) * 3
    rows[4, -1] = 40.0
    rows[5, ::3] = float("-inf")
    rows[6] += 1000.0
    rows[7, : v // 2] = float("-inf")
    return rows.to(DEVICE, torch.float32)


def _reference_grad(logits, labels, grad_h, grad_lp, temperature):
    leaf = logits.double().masked_fill(torch.isneginf(logits), -1e4).requires_grad_(True)
    logp, ent = logprobs_and_entropy_reference(leaf, labels, temperature=temperature)
    (grad_h.double() * ent + grad_lp.double() * logp).sum().backward()
    return leaf.grad


# (block_v, splits): whole rows in many tiles, rows cut into ranges of whole tiles (the
# last range shorter), ranges of a single tile, and the configuration's own choice.
TILINGS = [(16, 1), (16, 3), (64, 1), (64, 2), (16, 13), (16, None)]


@pytest.mark.parametrize("block_v,splits", TILINGS)
def test_tiles_and_ranges_against_float64(block_v, splits):
    v = 203
    logits = _rows(v, seed=block_v)
    labels = torch.tensor([0, 202, 101, 7, 202, 3, 48, 150], device=DEVICE)
    temperature = 0.7
    ent, logp, stats = entropy_fwd(
        logits, labels, None, 1 / temperature, block_v=block_v, splits=splits
    )
    true_logp, true_ent = logprobs_and_entropy_reference(logits, labels, temperature=temperature)
    _close(ent, true_ent)
    finite = torch.isfinite(true_logp)
    _close(logp[finite], true_logp[finite])
    assert torch.equal(torch.isneginf(logp), ~finite)  # label on a -inf logit
    _close(lse_from_stats(stats, 1 / temperature), torch.logsumexp(logits.double() / 0.7, -1))

    grad_h = torch.rand(8, generator=_gen(1)).to(DEVICE)
    # A label on a -inf logit has log p = -inf; leave it out of the loss, as the reference must.
    grad_lp = torch.rand(8, generator=_gen(2)).to(DEVICE) * finite
    grad = entropy_bwd(
        logits, labels, None, ent, stats, grad_h, grad_lp, 1 / temperature,
        block_v=block_v, splits=splits,
    )  # fmt: skip
    truth = _reference_grad(logits, labels, grad_h, grad_lp, temperature)
    torch.testing.assert_close(grad.double(), truth, atol=2e-6, rtol=1e-4)

    # In place: the gradient may overwrite the logits it is computed from.
    in_place = logits.clone()
    entropy_bwd(
        in_place, labels, None, ent, stats, grad_h, grad_lp, 1 / temperature, out=in_place,
        block_v=block_v, splits=splits,
    )  # fmt: skip
    torch.testing.assert_close(in_place, grad)


@pytest.mark.parametrize("splits", [1, 4])
def test_masked_and_zero_gradient_rows_in_ranges(splits):
    """Masked rows are written as 0 by exactly one program of a split row, never read, and
    rows whose upstream gradients are both 0 get a gradient of exactly 0."""
    logits = _rows(150, seed=3)
    logits[2] = float("nan")  # masked: reading it would poison the row's outputs
    logits[7] = float("-inf")  # all -inf: NaN entropy, but its gradients are 0 below
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool, device=DEVICE)
    labels = torch.arange(8, device=DEVICE) * 11
    ent, logp, stats = entropy_fwd(logits, labels, mask, 1.0, block_v=16, splits=splits)
    assert ent[2].item() == 0.0 and logp[2].item() == 0.0 and torch.all(stats[2] == 0)
    assert torch.isnan(ent[7]) and torch.isnan(logp[7])
    valid = torch.arange(8, device=DEVICE) < 7
    valid &= mask
    _close(ent[valid], entropy_reference(logits[valid]))

    grad_h = torch.rand(8, generator=_gen(4)).to(DEVICE)
    grad_lp = torch.rand(8, generator=_gen(5)).to(DEVICE)
    grad_h[[1, 7]] = 0.0
    grad_lp[[1, 7]] = 0.0
    grad = entropy_bwd(
        logits, labels, mask, ent, stats, grad_h, grad_lp, 1.0, block_v=16, splits=splits
    )
    assert torch.all(grad[[1, 2, 7]] == 0)
    rows = [0, 3, 4, 5, 6]
    truth = _reference_grad(logits[rows], labels[rows], grad_h[rows], grad_lp[rows], 1.0)
    torch.testing.assert_close(grad[rows].double(), truth, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 3])
def test_logits_near_float32_max_across_tiles(splits):
    """Issue: (tile max - running max) * (1/T) overflowed to -inf for finite logits near
    +-2e38 in different tiles, and 0 * -inf made the entropy NaN."""
    v = 64
    rows = torch.full((4, v), -2e38, dtype=torch.float64)
    rows[0, 50] = 2e38  # maximum in a later tile than the huge negative ones
    rows[1, 0] = 2e38  # maximum first, then tiles of only -2e38
    rows[2, [5, 60]] = 3.4e38  # two equal maxima: H = ln 2
    rows[3] = torch.randn(v, generator=_gen(6), dtype=torch.float64)
    rows[3, 40] = -3.4e38
    logits = rows.to(DEVICE, torch.float32)
    labels = torch.tensor([50, 0, 60, 1], device=DEVICE)
    ent, logp, stats = entropy_fwd(logits, labels, None, 1 / 0.6, block_v=16, splits=splits)
    true_logp, true_ent = logprobs_and_entropy_reference(logits, labels, temperature=0.6)
    _close(ent, true_ent)
    _close(logp, true_logp)
    assert ent[2].item() == pytest.approx(math.log(2), abs=1e-6)
    grad = entropy_bwd(
        logits, labels, None, ent, stats, torch.ones(4, device=DEVICE), None, 1 / 0.6,
        block_v=16, splits=splits,
    )  # fmt: skip
    assert torch.isfinite(grad).all()


def test_out_of_range_label_is_nan_in_kernel():
    """Under torch.compile the host range check is skipped: the kernel must not make up a
    number for a label outside the vocabulary."""
    logits = torch.randn(3, 10, generator=_gen(7)).to(DEVICE)
    labels = torch.tensor([0, 10, -1], device=DEVICE)
    for splits in (1, 2):
        _, logp, _ = entropy_fwd(logits, labels, None, 1.0, block_v=4, splits=splits)
        assert torch.isfinite(logp[0]) and torch.isnan(logp[1:]).all()


def test_temperatures_below_4e_39_do_not_overflow_the_scale():
    """log2(e) / T overflows fp32 before 1 / T does: the distribution is one-hot either way."""
    logits = torch.tensor([[0.0, 1.0, 0.5], [2.0, 2.0, -1.0]], device=DEVICE)
    ent, _, _ = entropy_fwd(logits, None, None, 1 / 3e-39)
    assert ent[0].item() == 0.0
    assert ent[1].item() == pytest.approx(math.log(2), abs=1e-6)


# -------------------------------------------------------------------------------------------
# Launch configuration and plans
# -------------------------------------------------------------------------------------------


def _resident(target, config) -> int:
    # The register pin makes the thread limit bind: 2048 threads per SM (NVIDIA), or
    # 8 waves on each of 4 SIMDs (AMD).
    if target.is_amd:
        return 32 // config.num_warps
    return 64 // config.num_warps


@pytest.mark.parametrize("arch", sorted(TARGETS))
@pytest.mark.parametrize("role", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_config_fills_the_gpu_with_whole_tiles(arch, role, dtype):
    target = TARGETS[arch]
    for n_rows, v in (*BENCHMARK_SHAPES, (1000, 152064), (3, 32000)):
        config = entropy_config(target, role, n_rows, v, dtype)
        assert config.vec * dtype.itemsize == 16  # 128-bit loads
        assert config.block_v % (config.vec * config.num_warps * target.warp_size) == 0
        assert config.chunk % config.block_v == 0
        assert (config.splits - 1) * config.chunk < v <= config.splits * config.chunk
        slots = target.sm_count * _resident(target, config)
        programs = n_rows * config.splits
        efficiency = programs / (math.ceil(programs / slots) * slots)
        if n_rows == 8192:
            assert config.splits == 1 or target.is_amd  # MI300X's 304 CUs: 3.4 waves
        if n_rows >= 256 and not target.is_amd:
            assert efficiency >= 0.9, (n_rows, config)
        if n_rows == 3:  # as many ranges as the minimum range length allows
            assert config.chunk == 4 * config.block_v


def test_config_overrides_and_errors():
    target = TARGETS["sm_90"]
    small = entropy_config(target, "fwd", 4, 7, torch.float32)
    assert (small.block_v, small.vec, small.num_warps, small.splits) == (8, 4, 1, 1)
    forced = entropy_config(target, "bwd", 5, 203, torch.float32, block_v=16, splits=3)
    assert (forced.block_v, forced.chunk, forced.splits) == (16, 80, 3)
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        entropy_config(target, "fwd", 4, 100, torch.float32, block_v=24)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        entropy_config(target, "fwd", 4, 100, torch.float32, splits=0)
    with pytest.raises(ValueError, match="role must be"):
        entropy_config(target, "both", 4, 100, torch.float32)


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_benchmark_plans_describe_the_launches(arch):
    target = TARGETS[arch]
    plans = benchmark_plans(target)
    assert len(plans) == len(BENCHMARK_SHAPES) * 3 * 2 * 2
    for plan in plans:
        n_rows, v = plan.shape["N"], plan.shape["V"]
        config = entropy_config(target, plan.role, n_rows, v, plan.dtype)
        names = plan.kernel.arg_names
        # Every argument is either a runtime one with a type or a compile-time constant.
        assert sorted(names) == sorted([*plan.signature, *plan.constexprs])
        assert set(plan.signature).isdisjoint(plan.constexprs)
        assert set(plan.aligned) <= set(plan.signature)
        assert "logits_ptr" in plan.aligned and "stride_inner" in plan.aligned
        assert plan.constexprs["stride_v"] == 1
        assert plan.constexprs["BLOCK_V"] == plan.loop_elements == config.block_v
        assert plan.num_warps == config.num_warps
        assert math.prod(plan.grid) == n_rows * config.splits
        has_labels = plan.extra["labels"]
        assert plan.constexprs["HAS_LABELS"] is has_labels
        assert ("labels_ptr" in plan.signature) is has_labels
        read = n_rows * v * plan.dtype.itemsize
        moved = read if plan.role == "fwd" else 2 * read
        assert moved <= plan.bytes_moved <= moved + 32 * n_rows
        pin = "waves_per_eu" if target.is_amd else "maxnreg"
        assert pin in plan.extra["options"]
    split = [p for p in plans if p.role == "fwd" and len(p.grid) == 2]
    assert split and all(p.kernel.fn.__name__ == "_entropy_fwd_split_kernel" for p in split)
