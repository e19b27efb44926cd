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
from saei_fast import validation as _checks
from saei_fast.kernels.band import launch as band_kernels
from saei_fast.kernels.band.config import BandConfig, band_config
from saei_fast.kernels.band.launch import band_select
from saei_fast.kernels.band.plans import benchmark_plans
from saei_fast.kernels.plan import TARGETS, target_for
from saei_fast.ops.band.op import SCOPES, flat_segments
from saei_fast.ops.band.torch_path import _band_rows_by_count, band_mask_torch, rank_window
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
    # The method the PyTorch path uses for masked rows on a GPU (and for a NaN at a valid
    # position on the CPU), on every case.
    values, valid, seg_len, _ = flat_segments(
        case.entropy, case.mask, None, case.scope, case.group_size or 1
    )
    if values.numel():
        rows, valid_rows = values.view(-1, seg_len), valid.view(-1, seg_len)
        counted = _band_rows_by_count(rows, valid_rows, *case.band).view(case.mask.shape)
        _assert_same(counted, expected, "count", case)


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


# -------------------------------------------------------------------------------------------
# The midpoint rule: examples, boundaries, partition, symmetry, ties
# -------------------------------------------------------------------------------------------

IMPLEMENTATIONS = ["reference", "torch", "segment", "chunked"]


def _up(x: float) -> float:
    return math.nextafter(x, 2.0)


def _down(x: float) -> float:
    return math.nextafter(x, -1.0)


def _select(
    implementation: str, entropy: torch.Tensor, mask, band, scope="sequence", group=None, tile=16
):
    """Selection of ``entropy [B, T]`` by one implementation (kernels with 16-token tiles by
    default, so that rows cross tile edges)."""
    if implementation == "reference":
        return entropy_band_mask_reference(
            entropy.cpu(), None if mask is None else mask.cpu(), band=band, scope=scope,
            group_size=group,
        )  # fmt: skip
    entropy = entropy.to(DEVICE)
    mask = None if mask is None else mask.to(DEVICE)
    values, valid, seg_len, bounds = flat_segments(entropy, mask, None, scope, group or 1)
    if implementation == "torch":
        got = band_mask_torch(values, valid, *band, seg_len=seg_len, bounds=bounds)
    else:
        got = band_select(
            values, valid, *band, seg_len=seg_len, bounds=bounds, schedule=implementation, tile=tile
        )
    return got.view(entropy.shape).cpu()


def _ranked_rows(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of distinct values in a seeded random order, the first ``lengths[i]`` valid."""
    gen = torch.Generator().manual_seed(seed)
    width = max(max(lengths), 1)
    entropy = torch.stack([torch.randperm(width, generator=gen) for _ in lengths]).float()
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return entropy.masked_fill(~mask, -7.0), mask


def _selected_ranks(entropy: torch.Tensor, mask: torch.Tensor, selected: torch.Tensor):
    """Per row, the ranks (among the valid, distinct values) of the selected tokens."""
    ranks = []
    for values, valid, chosen in zip(entropy, mask, selected, strict=True):
        order = sorted(values[valid].tolist())
        ranks.append(sorted(order.index(v) for v in values[chosen].tolist()))
    return ranks


def test_rank_window_is_the_midpoint_rule():
    """``ceil(fl(n*b) - 0.5)`` against the literal rule, for every n up to 300 and bands
    whose products land on, and one ulp either side of, half-integers."""
    bands = [*BANDS, (0.25, 0.75), (_up(0.25), _down(0.75)), (_down(0.25), _up(0.75))]
    bands += [(2.5 / 7, 1.0), (0.0, 2.5 / 6), (0.25, 0.45), (1e-300, 1.0), (0.0, 5e-324)]
    for lo, hi in bands:
        counts = torch.arange(301)
        first_t, stop_t = rank_window(counts, lo, hi)
        for n in range(301):
            literal = [r for r in range(n) if lo * n <= r + 0.5 < hi * n]
            first, stop = rank_window(n, lo, hi)
            assert list(range(first, stop)) == literal, (n, lo, hi)
            assert (first_t[n].item(), stop_t[n].item()) == (first, stop)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_design_examples(implementation):
    """DESIGN.md: n = 1 selects its token, n = 2 nothing, n = 3 rank 1, n = 4 ranks 1 and 2,
    n = 6 ranks 2 and 3, n = 7 ranks 2, 3 and 4 (middle third); n = 0 nothing."""
    examples = {0: [], 1: [0], 2: [], 3: [1], 4: [1, 2], 5: [2], 6: [2, 3], 7: [2, 3, 4]}
    entropy, mask = _ranked_rows(list(examples), seed=11)
    selected = _select(implementation, entropy, mask, (1 / 3, 2 / 3))
    assert not (selected & ~mask).any()
    assert _selected_ranks(entropy, mask, selected) == list(examples.values())


# (n, band, selected ranks). Each product n*lo or n*hi is a half-integer in float64 or one
# ulp away from one, so a guard (+-1e-9), float32 arithmetic, exact rational arithmetic or
# rounding the half-integer the other way selects differently.
BOUNDARY_CASES = [
    (6, (0.25, 0.75), [1, 2, 3]),  # 1.5 and 4.5 exactly: rank 1 in, rank 4 out
    (6, (_up(0.25), 0.75), [2, 3]),  # 1.5 + 1 ulp: rank 1 out (float32 would round to 1.5)
    (6, (0.25, _up(0.75)), [1, 2, 3, 4]),  # 4.5 + 1 ulp: rank 4 in
    (6, (_down(0.25), _down(0.75)), [1, 2, 3]),  # 1 ulp below both: no widening guard
    (10, (0.25, 0.45), [2, 3]),  # 10 * 0.45 rounds to 4.5 (exactly 4.5000000000000001)
    (10, (_up(0.25), _down(0.45)), [3]),
    (7, (2.5 / 7, 1.0), [2, 3, 4, 5, 6]),  # fl(7 * fl(2.5/7)) = 2.5, the exact product above
    (6, (0.0, 2.5 / 6), [0, 1]),  # fl(6 * fl(2.5/6)) = 2.5, the exact product above
    (4098, (0.25, 0.75), list(range(1024, 3073))),  # 1024.5 and 3073.5, 13 position bits
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_boundary_products(implementation):
    for n, band, expected in BOUNDARY_CASES:
        if n > 64 and implementation in ("segment", "chunked") and not torch.cuda.is_available():
            continue  # the interpreter walks 4098 tokens in 16-token tiles too slowly
        entropy, mask = _ranked_rows([n], seed=n)
        selected = _select(implementation, entropy, mask, band)
        assert _selected_ranks(entropy, mask, selected) == [expected], (n, band)


@pytest.mark.parametrize("implementation", ["segment", "chunked"])
def test_boundary_products_long_row(implementation):
    """The 4098-token boundary case through a kernel with its default tile."""
    n, band, expected = BOUNDARY_CASES[-1]
    entropy, mask = _ranked_rows([n], seed=n)
    values, valid, seg_len, _ = flat_segments(
        entropy.to(DEVICE), mask.to(DEVICE), None, "sequence", 1
    )
    got = band_select(values, valid, *band, seg_len=seg_len, schedule=implementation)
    assert _selected_ranks(entropy, mask, got.view(1, -1).cpu()) == [expected]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_thirds_partition_and_reversal(implementation):
    """The three thirds select each valid token exactly once, and reversing the order
    (negated, distinct values) maps the bottom third onto the top: every n up to 40 on the
    PyTorch path, a spread of n (one tile per row) through the interpreted kernels."""
    kernel = implementation in ("segment", "chunked") and not torch.cuda.is_available()
    lengths = [2, 5, 8, 11, 29, 40] if kernel else list(range(41))
    entropy, mask = _ranked_rows(lengths, seed=5)
    thirds = [(0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0)]
    chosen = [_select(implementation, entropy, mask, band, tile=64).int() for band in thirds]
    assert torch.equal(sum(chosen), mask.int())
    flipped_top = _select(implementation, -entropy, mask, (2 / 3, 1.0), tile=64)
    assert torch.equal(flipped_top.int(), chosen[0])


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "public-torch", "public-triton"])
def test_ties_break_by_position(implementation):
    """Equal values rank by position, ascending. Each case selects different tokens if ties
    broke the other way, or by bit pattern (-0.0 before +0.0)."""
    cases = [
        # n = 7, middle third = ranks 2, 3, 4: positions 2, 3, 4. Reversed ties: 3, 2, 1;
        # -0.0 first: 5, 0, 2.
        (torch.tensor([[0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 1.0]]), "sequence", None,
         [[0, 0, 1, 1, 1, 0, 0]]),
        # n = 6: 0.1 at positions 3, 4 rank 0, 1; 0.5 at 0, 1, 2 rank 2, 3, 4 -> positions
        # 0 and 1 (reversed ties: 2 and 1).
        (torch.tensor([[0.5, 0.5, 0.5, 0.1, 0.1, 0.9]]), "sequence", None,
         [[1, 1, 0, 0, 0, 0]]),
        # Batch scope ranks by flat position across rows: the 0.5 at flat 1, 2, 3, 4 rank
        # 0..3, so ranks 2, 3 are flat 3 and 4 (row 1); reversed ties would pick row 0.
        (torch.tensor([[1.0, 0.5, 0.5], [0.5, 0.5, 2.0]]), "batch", None,
         [[0, 0, 0], [1, 1, 0]]),
        # Group scope (2 rows per group): the 0.5 at flat 0..4 rank 0..4, so ranks 2, 3
        # are flat 2 and 3; reversed ties would pick flat 2 and 1.
        (torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.9]]), "group", 2,
         [[0, 0, 1], [1, 0, 0]]),
    ]  # fmt: skip
    for entropy, scope, group, expected in cases:
        band = (1 / 3, 2 / 3)
        if implementation.startswith("public"):
            got = saei_fast.entropy_band_mask(
                entropy.to(DEVICE), None, band=band, scope=scope, group_size=group,
                impl=implementation.removeprefix("public-"),
            ).cpu()  # fmt: skip
        else:
            got = _select(implementation, entropy, None, band, scope, group)
        assert got.int().tolist() == expected, (implementation, entropy.tolist())


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
    entropy = torch.randn(2, 7, generator=torch.Generator().manual_seed(4), requires_grad=True)
    selected = saei_fast.entropy_band_mask(entropy, None)
    assert selected.dtype == torch.bool
    assert not selected.requires_grad


# -------------------------------------------------------------------------------------------
# NaN: rejected before any work; the kernels' own order is defined (above +inf)
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_nan_at_valid_position_is_rejected(impl):
    # CPU tensors: a ValueError before any work (CUDA tensors assert on the device instead).
    entropy = torch.tensor([[0.1, math.nan, 0.3]])
    with pytest.raises(ValueError, match=r"entropy must not be NaN.*index \[0, 1\]"):
        saei_fast.entropy_band_mask(entropy, None, impl=impl)
    packed = entropy.reshape(-1)
    cu_seqlens = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="NaN"):
        saei_fast.entropy_band_mask(packed, None, cu_seqlens=cu_seqlens, impl=impl)


def test_device_checks_fire_exactly_on_bad_values(monkeypatch):
    """The branch CUDA tensors take (torch._assert_async, no host sync), run on the CPU,
    where the same call raises at once: it must fire on NaN at a valid position and on bad
    cu_seqlens, and stay quiet otherwise."""
    monkeypatch.setattr(_checks, "checks_on_device", lambda tensor: True)
    entropy = torch.tensor([[0.1, math.nan, 0.3]])
    with pytest.raises(RuntimeError, match="saei_fast: entropy must not be NaN"):
        saei_fast.entropy_band_mask(entropy, None)
    quiet = saei_fast.entropy_band_mask(entropy, torch.tensor([[True, False, True]]))
    assert quiet.tolist() == [[False, False, False]]
    with pytest.raises(RuntimeError, match="saei_fast: cu_seqlens must start at 0"):
        saei_fast.entropy_band_mask(torch.zeros(5), None, cu_seqlens=torch.tensor([0, 4, 3, 5]))
    with pytest.raises(RuntimeError, match="end at 5"):
        saei_fast.entropy_band_mask(torch.zeros(5), None, cu_seqlens=torch.tensor([0, 4]))
    fine = saei_fast.entropy_band_mask(torch.zeros(5), None, cu_seqlens=torch.tensor([0, 2, 5]))
    assert fine.tolist() == [False, False, False, True, False]  # n = 2: none; n = 3: rank 1


def test_checks_on_device_only_for_cuda_unless_asked(monkeypatch):
    cuda_tensor = type("FakeCuda", (), {"device": torch.device("cuda")})()
    monkeypatch.delenv("SAEI_SYNC_CHECKS", raising=False)
    assert _checks.checks_on_device(cuda_tensor)
    assert not _checks.checks_on_device(torch.zeros(1))
    monkeypatch.setenv("SAEI_SYNC_CHECKS", "1")
    assert not _checks.checks_on_device(cuda_tensor)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only on CUDA")
@pytest.mark.parametrize("packed", [False, True])
def test_public_op_never_syncs_on_cuda(packed):
    from saei_fast.tools.benchmarks.timing import count_host_syncs

    gen = torch.Generator().manual_seed(2)
    entropy = torch.rand(8, 300, generator=gen).cuda()
    mask = (torch.rand(8, 300, generator=gen) < 0.8).cuda()
    if packed:
        counts = mask.sum(-1)
        cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        values = entropy[mask]  # boolean indexing syncs: done before the count

        def call():
            return saei_fast.entropy_band_mask(
                values, None, scope="group", group_size=2, cu_seqlens=cu_seqlens
            )
    else:

        def call():
            return saei_fast.entropy_band_mask(entropy, mask, scope="group", group_size=2)

    call()  # compile outside the count
    assert count_host_syncs(call) == 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_at_valid_position_with_masked_tokens(implementation):
    """Without the check (torch.compile), a NaN at a valid position ranks above +inf and
    masked tokens still do not count, also where masked tokens sit between valid NaN."""
    values = torch.tensor([[math.nan, math.inf, 1.0, -7.0, math.nan, 0.5, math.nan]])
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    # n = 5: 0.5, 1.0, +inf, NaN (position 0), NaN (position 4); band (0.5, 1): ranks 2..4
    got = _select(implementation, values, mask, (0.5, 1.0))
    assert got.int().tolist() == [[1, 1, 0, 0, 1, 0, 0]]


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
    entropy = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), requires_grad=True)
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


# -------------------------------------------------------------------------------------------
# Launch configuration: one choice for the launcher and the compile-time report
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_name", sorted(TARGETS))
def test_benchmark_plans_are_the_launch_config(target_name):
    target = TARGETS[target_name]
    plans = benchmark_plans(target)
    shapes = {(p.shape["B"], p.shape["T"]) for p in plans}
    assert shapes == {(64, 4096), (16, 16384)}
    for plan in plans:
        names = set(plan.kernel.arg_names)
        assert set(plan.signature) | set(plan.constexprs) == names
        assert not set(plan.signature) & set(plan.constexprs)
        assert plan.signature["values_ptr"] == "*fp32"  # the entropy ops return float32
        assert set(plan.aligned) <= {n for n, t in plan.signature.items() if t.startswith("*")}
        assert plan.extra["options"] == {"enable_fp_fusion": False}  # as the launch
        rows, width = plan.shape["B"], plan.shape["T"]
        seg_len = {"sequence": width, "group": 4 * width, "batch": rows * width}
        n_segments = rows * width // seg_len[plan.extra["scope"]]
        config = band_config(target, rows * width, n_segments)
        assert plan.extra["schedule"] == config.schedule
        assert plan.num_warps == config.num_warps
        tile = plan.constexprs.get("TILE", plan.constexprs.get("CHUNK"))
        assert tile == config.tile
        per_segment = (
            1 if config.schedule == "segment" else -(-seg_len[plan.extra["scope"]] // tile)
        )
        assert plan.grid == (n_segments * per_segment,)
        # Warps of 32 lanes or wavefronts of 64: the same tokens per lane on every target.
        assert tile // (plan.num_warps * target.warp_size) in (8, 16) or plan.num_warps == 1


def test_launcher_launches_what_band_config_chooses(monkeypatch):
    """band_select takes schedule, tile and warps from band_config (the function the plans
    use): a configuration forced through it is what runs, and the answer stays exact."""
    chosen = []

    def forced(target, n_tokens, n_segments, *, schedule=None, tile=None):
        chosen.append((target.name, n_tokens, n_segments, schedule, tile))
        return BandConfig("chunked", 16, 1)

    monkeypatch.setattr(band_kernels, "band_config", forced)
    entropy, mask = _ranked_rows([7, 40, 0, 3], seed=9)
    values, valid, seg_len, _ = flat_segments(
        entropy.to(DEVICE), mask.to(DEVICE), None, "sequence", 1
    )
    got = band_select(values, valid, 1 / 3, 2 / 3, seg_len=seg_len)
    assert chosen == [(target_for(values.device).name, 160, 4, None, None)]
    expected = entropy_band_mask_reference(entropy, mask)
    assert torch.equal(got.view(entropy.shape).cpu(), expected)
