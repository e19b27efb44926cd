"""Catalogue: ``saei_fast.entropy_band_mask`` (both paths), ``band_entropy_objective`` and
``group_advantages`` (one path each)."""

from __future__ import annotations

import math

import torch

from bad_inputs.core import FLOAT32, FLOAT64, Raises, Returns, bernoulli_mask, randn, table
from saei_fast import band_entropy_objective, entropy_band_mask, group_advantages
from saei_fast.reference import (
    band_entropy_objective_reference,
    entropy_band_mask_reference,
    group_advantages_reference,
)

B, T = 4, 7  # rows, tokens per row
BOOL = {"dtype": torch.bool}


def _entropy(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return randn(B, T, seed=21, dtype=dtype).abs()


def _mask() -> torch.Tensor:
    return bernoulli_mask(B, T, seed=22)


def _with(position: tuple[int, int], value: float) -> torch.Tensor:
    entropy = _entropy()
    entropy[position] = value
    return entropy


def _band_error(error, names, *, entropy=_entropy, **kwargs) -> tuple:
    return lambda impl: entropy_band_mask(entropy(), impl=impl, **kwargs), Raises(error, names)


def _band_value(entropy=_entropy, mask=None, **kwargs) -> tuple:
    def call(impl):
        return entropy_band_mask(entropy(), None if mask is None else mask(), impl=impl, **kwargs)

    def expected():
        return entropy_band_mask_reference(entropy(), None if mask is None else mask(), **kwargs)

    return call, Returns(expected, **BOOL)


def _band_selects(entropy: list[float], selected: list[bool], **kwargs) -> tuple:
    """One row with the documented selection (the DESIGN.md examples of the midpoint rule)."""
    values = torch.tensor([entropy])
    return (
        lambda impl: entropy_band_mask(values, impl=impl, **kwargs),
        Returns(lambda: torch.tensor([selected]), **BOOL),
    )


def _packed(values: list[float], offsets: list[int], dtype=torch.int64) -> dict:
    return {"cu_seqlens": torch.tensor(offsets, dtype=dtype), "entropy": torch.tensor(values)}


def _packed_error(error, names, values, offsets, dtype=torch.int64) -> tuple:
    def call(impl):
        packed = _packed(values, offsets, dtype)
        return entropy_band_mask(packed["entropy"], cu_seqlens=packed["cu_seqlens"], impl=impl)

    return call, Raises(error, names)


BAND_ENTRY = {
    # ---- entropy and mask ----------------------------------------------------------------
    "band/entropy-list": _band_error(TypeError, "entropy", entropy=lambda: [[0.1, 0.2]]),
    "band/entropy-int": _band_error(TypeError, "entropy", entropy=lambda: _entropy().long()),
    "band/entropy-1d-unpacked": _band_error(ValueError, "entropy", entropy=lambda: _entropy()[0]),
    "band/entropy-3d": _band_error(ValueError, "entropy", entropy=lambda: _entropy()[None]),
    "band/nan-at-valid-position": _band_error(
        ValueError, "entropy", entropy=lambda: _with((1, 2), math.nan)
    ),
    "band/mask-float": _band_error(TypeError, "mask", mask=torch.ones(B, T)),
    "band/mask-shape": _band_error(ValueError, "mask", mask=torch.ones(B, T - 1).bool()),
    # ---- band ----------------------------------------------------------------------------
    "band/lo-equals-hi": _band_error(ValueError, "band", band=(0.5, 0.5)),
    "band/lo-above-hi": _band_error(ValueError, "band", band=(2 / 3, 1 / 3)),
    "band/lo-negative": _band_error(ValueError, "band", band=(-0.1, 0.5)),
    "band/hi-above-1": _band_error(ValueError, "band", band=(0.5, 1.5)),
    "band/lo-nan": _band_error(ValueError, "band", band=(math.nan, 0.5)),
    "band/hi-nan": _band_error(ValueError, "band", band=(0.2, math.nan)),
    "band/hi-inf": _band_error(ValueError, "band", band=(0.0, math.inf)),
    "band/scalar": _band_error(TypeError, "band", band=0.5),
    "band/three-values": _band_error(TypeError, "band", band=(0.1, 0.2, 0.3)),
    "band/str-values": _band_error(TypeError, "band", band=("0", "1")),
    "band/bool-values": _band_error(TypeError, "band", band=(False, True)),
    "band/none": _band_error(TypeError, "band", band=None),
    # ---- scope and group_size ------------------------------------------------------------
    "band/scope-unknown": _band_error(ValueError, "scope", scope="token"),
    "band/scope-capitalised": _band_error(ValueError, "scope", scope="Sequence"),
    "band/scope-none": _band_error(ValueError, "scope", scope=None),
    "band/group-without-size": _band_error(TypeError, "group_size", scope="group"),
    "band/group-size-0": _band_error(ValueError, "group_size", scope="group", group_size=0),
    "band/group-size-float": _band_error(TypeError, "group_size", scope="group", group_size=2.0),
    "band/group-size-bool": _band_error(TypeError, "group_size", scope="group", group_size=True),
    "band/group-size-not-dividing-rows": _band_error(
        ValueError, "group_size", scope="group", group_size=3
    ),
    # ---- packed layout -------------------------------------------------------------------
    "band/cu-seqlens-float": _packed_error(
        TypeError, "cu_seqlens", [0.1, 0.2, 0.3], [0, 1, 3], torch.float32
    ),
    "band/cu-seqlens-short-end": _packed_error(ValueError, "cu_seqlens", [0.1, 0.2, 0.3], [0, 2]),
    "band/cu-seqlens-decreasing": _packed_error(
        ValueError, "cu_seqlens", [0.1, 0.2, 0.3], [0, 2, 1, 3]
    ),
    "band/cu-seqlens-not-from-0": _packed_error(ValueError, "cu_seqlens", [0.1, 0.2, 0.3], [1, 3]),
    "band/cu-seqlens-with-padded-entropy": _band_error(
        ValueError, "entropy", cu_seqlens=torch.tensor([0, T])
    ),
    # ---- documented values ---------------------------------------------------------------
    "band/nan-where-masked": _band_value(lambda: _with((B - 1, T - 1), math.nan), _mask),
    "band/inf-ranks-last": _band_value(lambda: _with((1, 3), math.inf), band=(2 / 3, 1.0)),
    "band/-inf-ranks-first": _band_value(lambda: _with((1, 3), -math.inf), band=(0.0, 1 / 3)),
    "band/no-rows": _band_value(lambda: torch.zeros(0, T)),
    "band/no-tokens": _band_value(lambda: torch.zeros(B, 0)),
    "band/all-masked": _band_value(mask=lambda: torch.zeros(B, T, dtype=torch.bool)),
    "band/everything": _band_value(_entropy, _mask, band=(0.0, 1.0)),
    "band/group-scope": _band_value(_entropy, _mask, scope="group", group_size=2),
    "band/batch-scope": _band_value(_entropy, _mask, scope="batch"),
    "band/group-size-ignored-by-sequence-scope": _band_value(group_size=3),
    "band/float16": _band_value(lambda: _entropy(torch.float16), _mask),
    "band/bfloat16": _band_value(lambda: _entropy(torch.bfloat16), _mask),
    "band/float64": _band_value(lambda: _entropy(torch.float64), _mask),
    "band/all-ties": _band_value(lambda: torch.ones(B, T)),
    "band/n1-selects-its-token": _band_selects([0.3], [True]),
    "band/n2-selects-nothing": _band_selects([0.3, 0.1], [False, False]),
    "band/n3-selects-rank-1": _band_selects([0.3, 0.1, 0.2], [False, False, True]),
    "band/n6-ties-by-position": _band_selects([0.5] * 6, [False, False, True, True, False, False]),
    "band/n7-top-third": _band_selects(
        [7.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0],
        [True, False, True, False, False, False, False],
        band=(2 / 3, 1.0),
    ),
    "band/packed-empty-sequence": (
        lambda impl: entropy_band_mask(
            torch.tensor([0.3, 0.1, 0.2]), cu_seqlens=torch.tensor([0, 0, 3]), impl=impl
        ),
        Returns(lambda: torch.tensor([False, False, True]), **BOOL),
    ),
}


def _objective_value(entropy, band_mask, *, tolerance=FLOAT32) -> tuple:
    def call(_impl):
        return band_entropy_objective(entropy(), band_mask())

    def expected():
        return band_entropy_objective_reference(entropy(), band_mask())

    return call, Returns(expected, **tolerance)


def _objective_error(error, names, *, entropy=_entropy, band_mask=_mask) -> tuple:
    return lambda _impl: band_entropy_objective(entropy(), band_mask()), Raises(error, names)


def _objective_gradient(_impl):
    # Unselected entries never reach the gradient, whatever they hold.
    entropy = _with((0, 1), math.nan)
    entropy[2, 2] = math.inf
    band_mask = _mask()
    band_mask[0, 1] = band_mask[2, 2] = False
    entropy.requires_grad_(True)
    band_entropy_objective(entropy, band_mask).backward()
    return entropy.grad


def _objective_gradient_expected():
    entropy = _entropy().double().requires_grad_(True)
    band_mask = _mask()
    band_mask[0, 1] = band_mask[2, 2] = False
    band_entropy_objective_reference(entropy, band_mask).backward()
    return entropy.grad


OBJECTIVE_ENTRY = {
    "objective/entropy-list": _objective_error(TypeError, "entropy", entropy=lambda: [[0.1]]),
    "objective/entropy-int": _objective_error(
        TypeError, "entropy", entropy=lambda: torch.ones(B, T, dtype=torch.int32)
    ),
    "objective/entropy-3d": _objective_error(
        ValueError, "entropy", entropy=lambda: _entropy()[None]
    ),
    "objective/band-mask-none": _objective_error(TypeError, "band_mask", band_mask=lambda: None),
    "objective/band-mask-float": _objective_error(
        TypeError, "band_mask", band_mask=lambda: torch.ones(B, T)
    ),
    "objective/band-mask-shape": _objective_error(
        ValueError, "band_mask", band_mask=lambda: torch.ones(B, 1, dtype=torch.bool)
    ),
    "objective/nothing-selected-0": _objective_value(
        _entropy, lambda: torch.zeros(B, T, dtype=torch.bool)
    ),
    "objective/nan-where-unselected": _objective_value(
        lambda: _with((0, 0), math.nan), lambda: _mask().index_fill(1, torch.tensor([0]), False)
    ),
    "objective/float16-accumulates-in-float32": _objective_value(
        lambda: torch.full((2, 300), 60000.0, dtype=torch.float16),
        lambda: torch.ones(2, 300, dtype=torch.bool),
    ),
    "objective/float64-stays": _objective_value(
        lambda: _entropy(torch.float64), _mask, tolerance=FLOAT64
    ),
    "objective/no-rows": _objective_value(
        lambda: torch.zeros(0, T), lambda: torch.zeros(0, T, dtype=torch.bool)
    ),
    "objective/gradient-skips-unselected-nan-and-inf": (
        _objective_gradient,
        Returns(_objective_gradient_expected),
    ),
}


def _rewards(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _advantages_error(error, names, rewards=lambda: _rewards(1, 2, 3, 4), group_size=2, **kw):
    return lambda _impl: group_advantages(rewards(), group_size, **kw), Raises(error, names)


def _advantages_value(rewards, group_size=2, *, dtype=torch.float32, atol=2e-5, **kwargs):
    def call(_impl):
        return group_advantages(rewards(), group_size, **kwargs)

    def expected():
        return group_advantages_reference(rewards(), group_size, **kwargs)

    return call, Returns(expected, dtype=dtype, atol=atol, rtol=1e-5)


ADVANTAGES_ENTRY = {
    "advantages/rewards-list": _advantages_error(TypeError, "rewards", lambda: [1.0, 2.0]),
    "advantages/rewards-int": _advantages_error(
        TypeError, "rewards", lambda: torch.tensor([1, 2, 3, 4])
    ),
    "advantages/rewards-2d": _advantages_error(ValueError, "rewards", lambda: torch.ones(2, 2)),
    "advantages/rewards-nan": _advantages_error(
        ValueError, "rewards", lambda: _rewards(1, math.nan)
    ),
    "advantages/rewards-inf": _advantages_error(
        ValueError, "rewards", lambda: _rewards(1, math.inf, 0, 1)
    ),
    "advantages/rewards--inf": _advantages_error(
        ValueError, "rewards", lambda: _rewards(-math.inf, 1, 0, 1)
    ),
    "advantages/group-size-0": _advantages_error(ValueError, "group_size", group_size=0),
    "advantages/group-size-not-dividing": _advantages_error(ValueError, "group_size", group_size=3),
    "advantages/group-size-float": _advantages_error(TypeError, "group_size", group_size=2.0),
    "advantages/group-size-bool": _advantages_error(TypeError, "group_size", group_size=True),
    "advantages/scale-int": _advantages_error(TypeError, "scale", scale=1),
    "advantages/eps-negative": _advantages_error(ValueError, "eps", eps=-1e-6),
    "advantages/eps-nan": _advantages_error(ValueError, "eps", eps=math.nan),
    "advantages/eps-str": _advantages_error(TypeError, "eps", eps="1e-6"),
    "advantages/basic": _advantages_value(lambda: _rewards(1, 0, 0.5, 0.25, 1, 1)),
    "advantages/constant-group-0": _advantages_value(lambda: _rewards(0.3, 0.3, 1, 0), atol=0.0),
    "advantages/group-of-one-0": _advantages_value(lambda: _rewards(0.3, 2.0), 1, atol=0.0),
    "advantages/unscaled": _advantages_value(lambda: _rewards(1, 0, 2, 5), scale=False),
    "advantages/eps-0": _advantages_value(lambda: _rewards(1, 0, 2, 5), eps=0.0),
    "advantages/empty": _advantages_value(lambda: _rewards()),
    "advantages/float64-stays": _advantages_value(
        lambda: _rewards(1, 0, 2, 5, dtype=torch.float64), dtype=torch.float64, atol=1e-12
    ),
    # The spread of +-60000 overflows float16 (std 84853): computed in float32, not 0.
    "advantages/float16-60000": _advantages_value(
        lambda: _rewards(60000, -60000, 1, 2, dtype=torch.float16), dtype=torch.float16, atol=1e-3
    ),
    "advantages/bfloat16": _advantages_value(
        lambda: _rewards(1, 0, 2, 5, dtype=torch.bfloat16), dtype=torch.bfloat16, atol=1e-2
    ),
    # Finite float32 rewards whose square (the variance) overflows float32.
    "advantages/float32-near-max": _advantages_value(lambda: _rewards(3e38, -3e38, 1, 2)),
    "advantages/float32-sum-overflows": _advantages_value(lambda: _rewards(3e38, 2e38, 1, 2)),
}

BAND_CASES = table(BAND_ENTRY)
CASES = table(OBJECTIVE_ENTRY, dispatches=False) + table(ADVANTAGES_ENTRY, dispatches=False)
