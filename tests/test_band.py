"""Entropy-rank band selection and the SaEI objective, against the plain-Python references.

Property tests draw random layouts (row lengths 0, 1, 2, 3 ... 5000, masks with holes),
values with many ties, signed zeros and infinities, all three scopes, both layouts and
arbitrary bands, and require the exact reference mask on every case: from the PyTorch path,
from both Triton schedules (in Triton's CPU interpreter when there is no GPU) and through the
public op. The interpreter is slow, so its cases are smaller and fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import saei_fast
from saei_fast.kernels.band_select import band_select
from saei_fast.ops.band import SCOPES, band_mask_torch, flat_segments
from saei_fast.reference import band_entropy_objective_reference, entropy_band_mask_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCHEDULES = ["segment", "chunked"]
# Named bands: the default middle third, the ablations (bottom / top third, all tokens) and
# bands whose bounds land on rank boundaries for many n.
BANDS = [(1 / 3, 2 / 3), (0.0, 1 / 3), (2 / 3, 1.0), (0.0, 1.0), (0.2, 0.8), (0.5, 1.0)]
# Values that stress the key mapping: signed zeros (equal), infinities, subnormals, the
# largest floats and neighbours one float32 ulp apart.
EXTREMES = [
    -math.inf,
    -3.0e38,
    -1.0,
    -1.0e-45,
    -0.0,
    0.0,
    1.0e-45,
    1.0,
    math.nextafter(1.0, 2.0),
    math.nextafter(math.nextafter(1.0, 2.0), 2.0),
    3.0e38,
    math.inf,
]

slow_settings = settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -------------------------------------------------------------------------------------------
# Cases
# -------------------------------------------------------------------------------------------


@dataclass
class BandCase:
    entropy: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool
    scope: str
    group_size: int | None
    band: tuple[float, float]

    def kept(self, holes: bool) -> torch.Tensor:
        """Positions a packed layout holds: the valid tokens, or with ``holes`` each row up to
        its last valid token (masked tokens inside rows stay, marked by a 1-D mask)."""
        if not holes:
            return self.mask
        return self.mask.flip(-1).int().cummax(-1).values.flip(-1).bool()

    def packed(self, *, holes: bool = False):
        """The same rows packed back to back: ``(values [N], cu_seqlens, mask [N] or None)``."""
        kept = self.kept(holes)
        counts = kept.sum(-1)
        cu_seqlens = torch.zeros(len(counts) + 1, dtype=torch.int32, device=self.mask.device)
        cu_seqlens[1:] = counts.cumsum(0)
        return self.entropy[kept], cu_seqlens, self.mask[kept] if holes else None

    def unpack(self, packed_selection: torch.Tensor, *, holes: bool = False) -> torch.Tensor:
        full = torch.zeros_like(self.mask)
        full[self.kept(holes)] = packed_selection
        return full

    def reference(self) -> torch.Tensor:
        return entropy_band_mask_reference(
            self.entropy.cpu(),
            self.mask.cpu(),
            band=self.band,
            scope=self.scope,
            group_size=self.group_size,
        ).to(self.mask.device)


def _values(gen: torch.Generator, shape: tuple[int, int], kind: str) -> torch.Tensor:
    if kind == "ties":  # few distinct values: most ranks are decided by position
        pool = torch.tensor([-1.5, -0.0, 0.0, 0.25, 3.0])
        return pool[torch.randint(0, len(pool), shape, generator=gen)]
    if kind == "extremes":
        pool = torch.tensor(EXTREMES)
        return pool[torch.randint(0, len(pool), shape, generator=gen)]
    return torch.randn(shape, generator=gen) * 2.0


@st.composite
def band_cases(draw, *, max_rows: int, max_len: int, dtypes=(torch.float32,)) -> BandCase:
    rows = draw(st.integers(0, max_rows))
    # Lengths 0..3 are the edge cases of the band rule; the rest spread up to max_len.
    length = st.one_of(st.integers(0, 3), st.integers(0, max_len))
    lengths = draw(st.lists(length, min_size=rows, max_size=rows))
    width = max(lengths, default=0) + draw(st.integers(0, 3))
    kind = draw(st.sampled_from(["ties", "continuous", "extremes"]))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    entropy = _values(gen, (rows, width), kind).to(dtype)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
    if draw(st.booleans()):  # holes inside the rows, not only right padding
        mask &= torch.rand((rows, width), generator=gen) < 0.8
    # Padding holds values that would change the result if it were ranked.
    entropy = entropy.masked_fill(~mask, -7.0)

    scope = draw(st.sampled_from(SCOPES))
    group_size = None
    if scope == "group":
        group_size = draw(st.sampled_from([g for g in range(1, max(rows, 1) + 1) if rows % g == 0]))
    band = draw(
        st.one_of(
            st.sampled_from(BANDS),
            st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0))
            .filter(lambda pair: pair[0] < pair[1])
            .map(tuple),
        )
    )
    return BandCase(entropy.to(DEVICE), mask.to(DEVICE), scope, group_size, band)


def _public(case: BandCase, impl: str, *, packed: bool = False, holes: bool = False):
    if packed:
        values, cu_seqlens, mask = case.packed(holes=holes)
        selected = saei_fast.entropy_band_mask(
            values,
            mask,
            band=case.band,
            scope=case.scope,
            group_size=case.group_size,
            cu_seqlens=cu_seqlens,
            impl=impl,
        )
        return case.unpack(selected, holes=holes)
    return saei_fast.entropy_band_mask(
        case.entropy,
        case.mask,
        band=case.band,
        scope=case.scope,
        group_size=case.group_size,
        impl=impl,
    )


def _kernel(case: BandCase, schedule: str, tile: int, *, packed: bool = False, holes: bool = False):
    """The Triton launcher on the case's scopes, with a forced schedule and tile."""
    if packed:
        values, cu_seqlens, mask = case.packed(holes=holes)
        flat = flat_segments(values, mask, cu_seqlens, case.scope, case.group_size or 1)
    else:
        flat = flat_segments(case.entropy, case.mask, None, case.scope, case.group_size or 1)
    values, valid, seg_len, bounds = flat
    selected = band_select(
        values, valid, *case.band, seg_len=seg_len, bounds=bounds, schedule=schedule, tile=tile
    )
    return case.unpack(selected, holes=holes) if packed else selected.view(case.mask.shape)


def _assert_same(got: torch.Tensor, expected: torch.Tensor, what: str, case: BandCase) -> None:
    if not torch.equal(got, expected):
        wrong = (got != expected).nonzero().tolist()[:8]
        raise AssertionError(
            f"{what}: selection differs from the reference at {wrong} "
            f"(scope={case.scope}, group_size={case.group_size}, band={case.band}, "
            f"shape={tuple(case.mask.shape)})"
        )


# -------------------------------------------------------------------------------------------
# The band rule, both implementations, both layouts
# -------------------------------------------------------------------------------------------


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    case=band_cases(max_rows=6, max_len=5000, dtypes=(torch.float32, torch.bfloat16, torch.float16))
)
def test_torch_path_matches_reference(case):
    expected = case.reference()
    _assert_same(_public(case, "torch"), expected, "padded", case)
    _assert_same(_public(case, "torch", packed=True), expected, "packed", case)
    _assert_same(_public(case, "torch", packed=True, holes=True), expected, "holes", case)


@pytest.mark.triton
@slow_settings
@given(
    case=band_cases(max_rows=4, max_len=40, dtypes=(torch.float32, torch.bfloat16)),
    tile=st.sampled_from([16, 32]),
    holes=st.booleans(),
)
def test_triton_schedules_match_reference(case, tile, holes):
    expected = case.reference()
    for schedule in SCHEDULES:
        _assert_same(_kernel(case, schedule, tile), expected, f"padded {schedule}", case)
        packed = _kernel(case, schedule, tile, packed=True, holes=holes)
        _assert_same(packed, expected, f"packed {schedule} holes={holes}", case)


@pytest.mark.triton
@settings(max_examples=10, deadline=None, database=None)
@given(case=band_cases(max_rows=4, max_len=40, dtypes=(torch.float32, torch.float16)))
def test_triton_public_op_matches_reference(case):
    expected = case.reference()
    _assert_same(_public(case, "triton"), expected, "padded", case)
    _assert_same(_public(case, "triton", packed=True, holes=True), expected, "packed", case)


def _long_case(kind: str, scope: str, group_size: int | None = None) -> BandCase:
    # Rows of 5000 tokens cross many tiles and chunks and need 13 position bits.
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([5000, 4097, 1, 0, 2500, 3])
    width = 5000
    entropy = _values(gen, (len(lengths), width), kind)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return BandCase(entropy.to(DEVICE), mask.to(DEVICE), scope, group_size, (1 / 3, 2 / 3))


@pytest.mark.triton
@pytest.mark.parametrize(
    "schedule,tile,scope,group_size",
    [
        ("segment", 4096, "sequence", None),  # one program walks a 5000-token row in 2 tiles
        ("chunked", 2048, "group", 3),  # 3 to 5 chunks per group
        ("chunked", 2048, "batch", None),  # the whole batch as one segment, 7 chunks
    ],
)
@pytest.mark.parametrize("kind", ["ties", "continuous"])
def test_triton_long_rows(schedule, tile, scope, group_size, kind):
    case = _long_case(kind, scope, group_size)
    _assert_same(_kernel(case, schedule, tile), case.reference(), schedule, case)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_band_rule_examples(impl):
    """The examples of DESIGN.md: n = 3 selects rank 1, n = 6 ranks 2 and 3, n = 1 none;
    equal values rank by position."""
    entropy = torch.tensor(
        [
            [0.5, 0.1, 0.9, 0.0, 0.0, 0.0],  # n = 3 (mask): ranks 0.1 < 0.5 < 0.9 -> 0.5
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # n = 6: ranks 2 and 3 are 0.3 and 0.4
            [2.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # n = 1: nothing
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # ties: ranks 2 and 3 are positions 2 and 3
        ],
        device=DEVICE,
    )
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [1] * 6], device=DEVICE)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
        device=DEVICE,
    )
    got = saei_fast.entropy_band_mask(entropy, mask.bool(), impl=impl)
    assert torch.equal(got, expected)
    # Batch scope, 16 valid tokens: ranks floor(16/3) = 5 to floor(32/3) - 1 = 9 in the order
    # 0.1 0.1 0.2 0.3 0.4 | 0.5 (row 0) 0.5 (row 1) 0.6 0.9 1.0 (row 3, first) | 1.0 ...
    batch = saei_fast.entropy_band_mask(entropy, mask.bool(), scope="batch", impl=impl)
    expected_batch = torch.zeros_like(expected)
    expected_batch[0, [0, 2]] = True
    expected_batch[1, [0, 1]] = True
    expected_batch[3, 0] = True
    assert torch.equal(batch, expected_batch)


@pytest.mark.parametrize("implementation", ["torch", "segment", "chunked"])
def test_signed_zeros_tie_by_position(implementation):
    # -0.0 == 0.0: ranks follow positions, so the middle third is positions 2 and 3. Ordered
    # by bit pattern instead, the -0.0 would come first and positions 5 and 0 be selected.
    values = torch.tensor([0.0, -0.0, 0.0, -0.0, 0.0, -0.0], device=DEVICE)
    if implementation == "torch":
        got = band_mask_torch(values, None, 1 / 3, 2 / 3, seg_len=6)
    else:
        got = band_select(values, None, 1 / 3, 2 / 3, seg_len=6, schedule=implementation)
    assert got.cpu().tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_float64_is_not_rounded(impl):
    # Distinct in float64, equal in float32: rounded, position would pick the middle token.
    entropy = torch.tensor([[1 + 1e-12, 1 + 3e-12, 1 + 2e-12]], dtype=torch.float64)
    got = saei_fast.entropy_band_mask(entropy.to(DEVICE), None, impl=impl)
    assert got.cpu().tolist() == [[False, False, True]]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_non_contiguous_input(impl):
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 40, generator=gen).to(DEVICE)
    entropy = wide[:, ::2]  # strided rows
    mask = (torch.rand(5, 20, generator=gen) < 0.7).to(DEVICE)
    got = saei_fast.entropy_band_mask(entropy, mask, scope="group", group_size=5, impl=impl)
    expected = entropy_band_mask_reference(entropy.cpu(), mask.cpu(), scope="group", group_size=5)
    assert torch.equal(got.cpu(), expected)


def test_no_gradient_flows_through_mask():
    entropy = torch.randn(2, 7, requires_grad=True)
    selected = saei_fast.entropy_band_mask(entropy, None)
    assert selected.dtype == torch.bool
    assert not selected.requires_grad


# -------------------------------------------------------------------------------------------
# NaN: rejected before any work; the kernels' own order is defined (above +inf)
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nan_at_valid_position_is_rejected(impl):
    entropy = torch.tensor([[0.1, math.nan, 0.3]], device=DEVICE)
    with pytest.raises(ValueError, match=r"entropy must not be NaN.*index \[0, 1\]"):
        saei_fast.entropy_band_mask(entropy, None, impl=impl)
    packed = entropy.reshape(-1)
    cu_seqlens = torch.tensor([0, 3], device=DEVICE)
    with pytest.raises(ValueError, match="NaN"):
        saei_fast.entropy_band_mask(packed, None, cu_seqlens=cu_seqlens, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nan_at_masked_position_is_ignored(impl):
    entropy = torch.tensor([[0.3, math.nan, 0.1, 0.2]], device=DEVICE)
    mask = torch.tensor([[True, False, True, True]], device=DEVICE)
    got = saei_fast.entropy_band_mask(entropy, mask, impl=impl)
    assert got.cpu().tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("implementation", ["torch", "segment", "chunked"])
def test_nan_ranks_above_inf_without_the_check(implementation):
    """The order the select gives NaN when the check is skipped (under torch.compile)."""
    values = torch.tensor([math.nan, math.inf, 1.0, math.nan, -math.inf, 0.5], device=DEVICE)
    band = (0.5, 1.0)  # ranks 3, 4, 5 of 6: +inf, then the two NaN
    if implementation == "torch":
        got = band_mask_torch(values, None, *band, seg_len=6)
    else:
        got = band_select(values, None, *band, seg_len=6, schedule=implementation, tile=16)
    expected = entropy_band_mask_reference(values.cpu()[None], None, band=band)[0]
    assert expected.tolist() == [True, True, False, True, False, False]
    assert torch.equal(got.cpu(), expected)


# -------------------------------------------------------------------------------------------
# Argument checks
# -------------------------------------------------------------------------------------------

E = torch.zeros(4, 5)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((E.long(), None), {}, TypeError, "entropy must be float16"),
        (([1.0], None), {}, TypeError, "entropy must be a torch.Tensor"),
        ((E[0], None), {}, ValueError, r"\[B, T\].*got shape \(5,\) without cu_seqlens"),
        ((torch.zeros(2, 2, 2), None), {}, ValueError, "must be \\[B, T\\]"),
        ((E, E), {}, TypeError, "mask must be a bool tensor"),
        ((E, E.bool()[:, :3]), {}, ValueError, r"mask must have shape \(4, 5\)"),
        ((E, None), {"band": (0.5, 0.5)}, ValueError, "0 <= lo < hi <= 1"),
        ((E, None), {"band": (-0.1, 0.5)}, ValueError, "0 <= lo < hi <= 1"),
        ((E, None), {"band": (0.1, 1.5)}, ValueError, "0 <= lo < hi <= 1"),
        ((E, None), {"band": (0.1, math.nan)}, ValueError, "0 <= lo < hi <= 1"),
        ((E, None), {"band": 0.5}, TypeError, "band must be a pair"),
        ((E, None), {"band": (0.1, 0.2, 0.3)}, TypeError, "band must be a pair"),
        ((E, None), {"band": ("0", 1)}, TypeError, "band must hold two floats"),
        ((E, None), {"scope": "row"}, ValueError, "scope must be one of"),
        ((E, None), {"scope": "group"}, TypeError, "group_size must be an int, got NoneType"),
        ((E, None), {"scope": "group", "group_size": 0}, ValueError, "group_size must be >= 1"),
        ((E, None), {"scope": "group", "group_size": 3}, ValueError, r"divide.*rows.*\(4\)"),
        ((E, None), {"cu_seqlens": torch.tensor([0, 20])}, ValueError, "packed \\[N\\]"),
        ((E.view(-1), None), {"cu_seqlens": torch.tensor([0.0, 20.0])}, TypeError, "int32"),
        ((E.view(-1), None), {"cu_seqlens": torch.tensor([[0, 20]])}, ValueError, "1-D"),
        ((E.view(-1), None), {"cu_seqlens": torch.tensor([1, 20])}, ValueError, "start at 0"),
        ((E.view(-1), None), {"cu_seqlens": torch.tensor([0, 19])}, ValueError, "end at 20"),
        ((E.view(-1), None), {"cu_seqlens": torch.tensor([0, 9, 5, 20])}, ValueError, "non-dec"),
        (
            (E.view(-1), None),
            {"cu_seqlens": torch.tensor([0, 5, 20]), "scope": "group", "group_size": 3},
            ValueError,
            r"divide the number of sequences in cu_seqlens \(2\)",
        ),
    ],
)
def test_bad_arguments_raise_before_work(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        saei_fast.entropy_band_mask(*args, **kwargs)


def test_group_size_is_ignored_by_other_scopes():
    entropy = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    plain = saei_fast.entropy_band_mask(entropy, None, scope="sequence")
    assert torch.equal(plain, saei_fast.entropy_band_mask(entropy, None, group_size=2))
    batch = saei_fast.entropy_band_mask(entropy, None, scope="batch")
    assert torch.equal(
        batch, saei_fast.entropy_band_mask(entropy, None, scope="batch", group_size=5)
    )


# -------------------------------------------------------------------------------------------
# Objective
# -------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None)
@given(case=band_cases(max_rows=5, max_len=60, dtypes=(torch.float32, torch.bfloat16)))
def test_objective_value_and_gradient(case):
    # Finite selected values (a finite reference); NaN padding must not leak into anything.
    entropy = case.entropy.float().clamp(-10.0, 10.0)
    entropy = torch.where(case.mask, entropy, torch.nan)
    band_mask = saei_fast.entropy_band_mask(entropy, case.mask, band=case.band, impl="torch")
    # float32 sums of at most 64 terms: error below 64 ulps of the largest selected value.
    atol = 64 * 2.0**-24 * max(1.0, entropy[band_mask].abs().max().item() if band_mask.any() else 0)

    truth_leaf = entropy.detach().cpu().double().requires_grad_(True)
    truth = band_entropy_objective_reference(truth_leaf, band_mask.cpu())
    truth.backward()

    leaf = entropy.detach().requires_grad_(True)
    ours = saei_fast.band_entropy_objective(leaf, band_mask)
    ours.backward()
    assert ours.dtype == torch.float32 and ours.dim() == 0
    torch.testing.assert_close(ours.cpu().double(), truth.detach(), rtol=0, atol=atol)
    # The gradient is 1 / (row count * rows): a few float32 roundings.
    torch.testing.assert_close(leaf.grad.cpu().double(), truth_leaf.grad, rtol=1e-6, atol=0)

    # Packed: same tokens, same rows, same objective and gradient.
    _, cu_seqlens, _ = case.packed()
    packed_leaf = entropy[case.mask].detach().requires_grad_(True)
    packed = saei_fast.band_entropy_objective(
        packed_leaf, band_mask[case.mask], cu_seqlens=cu_seqlens
    )
    packed.backward()
    torch.testing.assert_close(packed.cpu().double(), truth.detach(), rtol=0, atol=atol)
    torch.testing.assert_close(
        packed_leaf.grad.cpu().double(), truth_leaf.grad[case.mask.cpu()], rtol=1e-6, atol=0
    )


def test_objective_is_zero_without_selection():
    entropy = torch.randn(3, 4, requires_grad=True)
    band_mask = torch.zeros(3, 4, dtype=torch.bool)
    value = saei_fast.band_entropy_objective(entropy, band_mask)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(entropy.grad, torch.zeros(3, 4))


def test_objective_example():
    # Row means 2.0 and 5.0; the third row selects nothing and is left out: (2 + 5) / 2.
    entropy = torch.tensor([[1.0, 3.0, 9.0], [5.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    band_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert saei_fast.band_entropy_objective(entropy, band_mask).item() == 3.5


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((E, E), {}, TypeError, "band_mask must be a bool tensor"),
        ((E, None), {}, TypeError, "band_mask must be a torch.Tensor"),
        ((E, E.bool()[:2]), {}, ValueError, r"band_mask must have shape \(4, 5\)"),
        ((E.view(-1), E.bool().view(-1)), {}, ValueError, "without cu_seqlens"),
        (
            (E.view(-1), E.bool().view(-1)),
            {"cu_seqlens": torch.tensor([0, 3])},
            ValueError,
            "end at 20",
        ),
    ],
)
def test_objective_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        saei_fast.band_entropy_objective(*args, **kwargs)


# -------------------------------------------------------------------------------------------
# torch.compile
# -------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    def objective(entropy, mask):
        band_mask = saei_fast.entropy_band_mask(entropy, mask, scope="group", group_size=2)
        return saei_fast.band_entropy_objective(entropy, band_mask)

    gen = torch.Generator().manual_seed(5)
    entropy = torch.rand(4, 33, generator=gen).to(DEVICE)
    mask = (torch.rand(4, 33, generator=gen) < 0.8).to(DEVICE)
    eager_leaf = entropy.clone().requires_grad_(True)
    expected = objective(eager_leaf, mask)
    expected.backward()

    compiled = torch.compile(objective, fullgraph=True)
    leaf = entropy.clone().requires_grad_(True)
    result = compiled(leaf, mask)
    result.backward()
    torch.testing.assert_close(result, expected)
    torch.testing.assert_close(leaf.grad, eager_leaf.grad)
