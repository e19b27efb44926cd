"""Catalogue: ``saei_fast.linear_entropy`` and ``saei_fast.linear_logprobs_and_entropy``
(both paths)."""

from __future__ import annotations

import math

import torch

from bad_inputs.core import (
    FLOAT32,
    FLOAT64,
    Raises,
    Returns,
    bernoulli_mask,
    randint,
    randn,
    table,
)
from saei_fast import linear_entropy, linear_logprobs_and_entropy
from saei_fast.reference import (
    linear_entropy_reference,
    linear_logprobs_and_entropy_reference,
)

N, D, V = 4, 8, 16  # tokens, hidden size, vocabulary: tiny for the interpreter


def _hidden(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return randn(N, D, seed=11, dtype=dtype)


def _weight(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return randn(V, D, seed=12, dtype=dtype) / math.sqrt(D)


def _bias(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return randn(V, seed=13, dtype=dtype)


def _labels() -> torch.Tensor:
    return randint(V, N, seed=14)


def _mask() -> torch.Tensor:
    return bernoulli_mask(N, seed=15)


def _entropy_error(error, names, *, hidden=_hidden, weight=_weight, **kwargs) -> tuple:
    return (
        lambda impl: linear_entropy(hidden(), weight(), impl=impl, **kwargs),
        Raises(error, names),
    )


def _lpe_error(error, names, *, labels=_labels, **kwargs) -> tuple:
    return (
        lambda impl: linear_logprobs_and_entropy(
            _hidden(), _weight(), labels(), impl=impl, **kwargs
        ),
        Raises(error, names),
    )


def _entropy_value(hidden=_hidden, weight=_weight, *, tolerance=FLOAT32, **kwargs) -> tuple:
    def call(impl):
        return linear_entropy(hidden(), weight(), impl=impl, **kwargs)

    def expected():
        return linear_entropy_reference(hidden(), weight(), **kwargs)

    return call, Returns(expected, **tolerance)


def _lpe_value(labels=_labels, *, hidden=_hidden, **kwargs) -> tuple:
    def call(impl):
        return linear_logprobs_and_entropy(hidden(), _weight(), labels(), impl=impl, **kwargs)

    def expected():
        return linear_logprobs_and_entropy_reference(hidden(), _weight(), labels(), **kwargs)

    return call, Returns(expected)


def _nan_row_hidden() -> torch.Tensor:
    return _hidden().index_fill(0, torch.tensor([1]), math.nan)


def _bf16_entropy(impl):
    return linear_entropy(_hidden(torch.bfloat16), _weight(torch.bfloat16), impl=impl)


def _bf16_expected():
    return linear_entropy_reference(_hidden(torch.bfloat16), _weight(torch.bfloat16))


ENTRY = {
    # ---- hidden / weight / bias ----------------------------------------------------------
    "linear/hidden-list": _entropy_error(TypeError, "hidden", hidden=lambda: [[0.0] * D] * N),
    "linear/hidden-int": _entropy_error(TypeError, "hidden", hidden=lambda: _hidden().long()),
    "linear/hidden-0d": _entropy_error(ValueError, "hidden", hidden=lambda: torch.tensor(1.0)),
    "linear/weight-none": _entropy_error(TypeError, "weight", weight=lambda: None),
    "linear/weight-int": _entropy_error(TypeError, "weight", weight=lambda: _weight().int()),
    "linear/weight-1d": _entropy_error(ValueError, "weight", weight=lambda: _weight()[0]),
    "linear/weight-3d": _entropy_error(ValueError, "weight", weight=lambda: _weight()[None]),
    "linear/weight-transposed": _entropy_error(ValueError, "weight", weight=lambda: _weight().T),
    "linear/weight-wrong-hidden-size": _entropy_error(
        ValueError, "weight", weight=lambda: _weight()[:, :-1]
    ),
    "linear/weight-float64-hidden-float32": _entropy_error(
        TypeError, "weight", weight=lambda: _weight(torch.float64)
    ),
    "linear/empty-vocab": _entropy_error(ValueError, "vocab", weight=lambda: torch.zeros(0, D)),
    "linear/empty-hidden-size": _entropy_error(
        ValueError,
        "hidden",
        hidden=lambda: torch.zeros(N, 0),
        weight=lambda: torch.zeros(V, 0),
    ),
    "linear/bias-list": _entropy_error(TypeError, "bias", bias=[0.0] * V),
    "linear/bias-wrong-length": _entropy_error(ValueError, "bias", bias=torch.zeros(V - 1)),
    "linear/bias-2d": _entropy_error(ValueError, "bias", bias=torch.zeros(1, V)),
    "linear/bias-float64": _entropy_error(
        TypeError, "bias", bias=torch.zeros(V, dtype=torch.float64)
    ),
    # ---- temperature and mask ------------------------------------------------------------
    "linear/temperature-0": _entropy_error(ValueError, "temperature", temperature=0.0),
    "linear/temperature-negative": _entropy_error(ValueError, "temperature", temperature=-0.5),
    "linear/temperature-nan": _entropy_error(ValueError, "temperature", temperature=math.nan),
    "linear/temperature-inf": _entropy_error(ValueError, "temperature", temperature=math.inf),
    "linear/temperature-1e-39": _entropy_error(ValueError, "temperature", temperature=1e-39),
    "linear/temperature-bool": _entropy_error(TypeError, "temperature", temperature=False),
    "linear/temperature-str": _entropy_error(TypeError, "temperature", temperature="0.7"),
    "linear/mask-float": _entropy_error(TypeError, "mask", mask=torch.ones(N)),
    "linear/mask-too-long": _entropy_error(ValueError, "mask", mask=torch.ones(N + 1).bool()),
    "linear/mask-2d": _entropy_error(ValueError, "mask", mask=torch.ones(1, N).bool()),
    # ---- labels --------------------------------------------------------------------------
    "linear-logprobs/labels-none": _lpe_error(TypeError, "labels", labels=lambda: None),
    "linear-logprobs/labels-float": _lpe_error(TypeError, "labels", labels=lambda: _labels() * 1.0),
    "linear-logprobs/labels-shape": _lpe_error(ValueError, "labels", labels=lambda: _labels()[:2]),
    "linear-logprobs/label-equals-vocab": _lpe_error(
        ValueError, "labels", labels=lambda: torch.full((N,), V)
    ),
    "linear-logprobs/label-negative": _lpe_error(
        ValueError, "labels", labels=lambda: torch.full((N,), -1)
    ),
    "linear-logprobs/temperature-0": _lpe_error(ValueError, "temperature", temperature=0.0),
    # ---- documented values ---------------------------------------------------------------
    "linear/bias-and-temperature": _entropy_value(bias=_bias(), temperature=0.7),
    "linear/masked-positions-0": _entropy_value(mask=_mask()),
    "linear/all-masked": _entropy_value(mask=torch.zeros(N, dtype=torch.bool)),
    "linear/no-tokens": _entropy_value(hidden=lambda: torch.zeros(0, D)),
    "linear/no-tokens-3d": _entropy_value(hidden=lambda: torch.zeros(2, 0, D)),
    "linear/vocab-1": _entropy_value(weight=lambda: _weight()[:1]),
    "linear/3d-non-contiguous": _entropy_value(hidden=lambda: randn(3, 4, D, seed=16)[:, ::2]),
    "linear/float64-stays": _entropy_value(
        hidden=lambda: _hidden(torch.float64),
        weight=lambda: _weight(torch.float64),
        tolerance=FLOAT64,
    ),
    "linear/temperature-1e-38": _entropy_value(temperature=1e-38),
    "linear-logprobs/padding-where-masked": _lpe_value(
        lambda: torch.where(_mask(), _labels(), -100), mask=_mask()
    ),
    "linear-logprobs/bias": _lpe_value(bias=_bias()),
    # A NaN or +inf logit leaves its row no distribution: NaN, also in the reference.
    "linear/nan-hidden-row-nan": _entropy_value(hidden=_nan_row_hidden),
    "linear/inf-bias-entry-nan": _entropy_value(
        bias=_bias().index_fill(0, torch.tensor([3]), math.inf)
    ),
    "linear-logprobs/nan-hidden-row-nan": _lpe_value(hidden=_nan_row_hidden),
    # Triton's interpreter computes bf16 tl.dot wrongly: the Triton path refuses there.
    "linear/bfloat16-under-interpreter": (
        _bf16_entropy,
        # The PyTorch path's bf16 GEMM rounds the logits to bf16: 5e-4 off the float64 truth
        # here, where eager bf16 PyTorch (naive_linear_entropy) is 6.5e-3 off.
        Returns(_bf16_expected, atol=2e-3, rtol=0.0),
        Raises(ValueError, "TRITON_INTERPRET=1"),
    ),
}

CASES = table(ENTRY)
