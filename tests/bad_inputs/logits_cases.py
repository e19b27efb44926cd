"""Catalogue: ``saei_fast.entropy`` and ``saei_fast.logprobs_and_entropy`` (both paths)."""

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
from saei_fast import entropy, logprobs_and_entropy
from saei_fast.reference import entropy_reference, logprobs_and_entropy_reference

SHAPE = (2, 3, 11)  # [B, T, V]: tiny, since the Triton path runs in the interpreter
V = SHAPE[-1]


def _logits(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return randn(*SHAPE, seed=1, dtype=dtype)


def _labels(dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return randint(V, *SHAPE[:-1], seed=2, dtype=dtype)


def _mask() -> torch.Tensor:
    return bernoulli_mask(*SHAPE[:-1], seed=3)


def _with_row(values: list[float], row: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The base logits with one row replaced (an edge distribution among normal rows)."""
    logits = _logits()
    logits[row] = torch.tensor(values + [0.0] * (V - len(values)))
    return logits


def _two_block_extremes() -> torch.Tensor:
    """Finite fp32 logits near +-2e38 in two different vocab blocks of the forward kernel
    (2048 fp32 logits per block): the running max of block 0 minus the max of block 1
    overflows fp32, which must not turn the one-hot row into NaN."""
    logits = torch.zeros(1, 4096)
    logits[0, 0] = 2e38
    logits[0, 2048:] = -2e38
    return logits


def _all_but(position: tuple[int, int]) -> torch.Tensor:
    mask = torch.ones(SHAPE[:-1], dtype=torch.bool)
    mask[position] = False
    return mask


def _entropy_error(error, names, *, logits=_logits, **kwargs) -> tuple:
    return lambda impl: entropy(logits(), impl=impl, **kwargs), Raises(error, names)


def _entropy_value(logits, *, temperature=1.0, mask=None, tolerance=FLOAT32) -> tuple:
    def call(impl):
        return entropy(logits(), temperature=temperature, mask=mask, impl=impl)

    def expected():
        return entropy_reference(logits(), temperature=temperature, mask=mask)

    return call, Returns(expected, **tolerance)


def _lpe_error(error, names, *, labels=_labels, logits=_logits, **kwargs) -> tuple:
    return (
        lambda impl: logprobs_and_entropy(logits(), labels(), impl=impl, **kwargs),
        Raises(error, names),
    )


def _lpe_value(logits, labels, *, temperature=1.0, mask=None) -> tuple:
    def call(impl):
        return logprobs_and_entropy(
            logits(), labels(), temperature=temperature, mask=mask, impl=impl
        )

    def expected():
        return logprobs_and_entropy_reference(
            logits(), labels(), temperature=temperature, mask=mask
        )

    return call, Returns(expected)


def _compiled_out_of_range_label(impl):
    # Under torch.compile the host-side label check is skipped (it would sync); the op then
    # gives a NaN log-prob for the bad label rather than an indexing error or a number.
    labels = _labels()
    labels[1, 2] = V

    def run(logits, labels):
        return logprobs_and_entropy(logits, labels, impl=impl)

    # No torch._dynamo.reset(): it would also throw away the CPU path's compiled kernels
    # (compiled once per process, which tests/test_cpu_path.py holds). A new function
    # compiles anew anyway.
    return torch.compile(run, backend="eager", fullgraph=True)(_logits(), labels)


def _compiled_expected():
    logp, ent = logprobs_and_entropy_reference(_logits(), _labels())
    logp[1, 2] = math.nan
    return logp, ent


ENTRY = {
    # ---- entropy: wrong types and dtypes -------------------------------------------------
    "entropy/logits-list": _entropy_error(TypeError, "logits", logits=lambda: [[0.0, 1.0]]),
    "entropy/logits-int64": _entropy_error(TypeError, "logits", logits=lambda: _logits().long()),
    "entropy/logits-bool": _entropy_error(TypeError, "logits", logits=lambda: _logits() > 0),
    "entropy/logits-complex": _entropy_error(
        TypeError, "logits", logits=lambda: _logits().to(torch.complex64)
    ),
    "entropy/logits-0d": _entropy_error(ValueError, "logits", logits=lambda: torch.tensor(1.0)),
    "entropy/vocab-0": _entropy_error(ValueError, "logits", logits=lambda: torch.zeros(2, 3, 0)),
    # ---- entropy: temperatures -----------------------------------------------------------
    "entropy/temperature-0": _entropy_error(ValueError, "temperature", temperature=0.0),
    "entropy/temperature-int-0": _entropy_error(ValueError, "temperature", temperature=0),
    "entropy/temperature-negative": _entropy_error(ValueError, "temperature", temperature=-1.0),
    "entropy/temperature-nan": _entropy_error(ValueError, "temperature", temperature=math.nan),
    "entropy/temperature-inf": _entropy_error(ValueError, "temperature", temperature=math.inf),
    "entropy/temperature--inf": _entropy_error(ValueError, "temperature", temperature=-math.inf),
    # 1/T overflows float32: every entropy would be NaN
    "entropy/temperature-1e-39": _entropy_error(ValueError, "temperature", temperature=1e-39),
    "entropy/temperature-bool": _entropy_error(TypeError, "temperature", temperature=True),
    "entropy/temperature-str": _entropy_error(TypeError, "temperature", temperature="1.0"),
    "entropy/temperature-tensor": _entropy_error(
        TypeError, "temperature", temperature=torch.tensor(1.0)
    ),
    "entropy/temperature-none": _entropy_error(TypeError, "temperature", temperature=None),
    # ---- entropy: masks ------------------------------------------------------------------
    "entropy/mask-float": _entropy_error(TypeError, "mask", mask=torch.ones(2, 3)),
    "entropy/mask-int": _entropy_error(TypeError, "mask", mask=torch.ones(2, 3, dtype=torch.int)),
    "entropy/mask-list": _entropy_error(TypeError, "mask", mask=[[True] * 3] * 2),
    "entropy/mask-transposed": _entropy_error(
        ValueError, "mask", mask=torch.ones(3, 2, dtype=torch.bool)
    ),
    "entropy/mask-with-vocab-dim": _entropy_error(
        ValueError, "mask", mask=torch.ones(*SHAPE, dtype=torch.bool)
    ),
    "entropy/mask-broadcastable": _entropy_error(
        ValueError, "mask", mask=torch.ones(1, 3, dtype=torch.bool)
    ),
    # ---- entropy: documented values at the edges -----------------------------------------
    "entropy/no-tokens": _entropy_value(lambda: torch.zeros(0, V)),
    "entropy/no-tokens-3d": _entropy_value(lambda: torch.zeros(2, 0, V)),
    "entropy/vocab-1": _entropy_value(lambda: randn(2, 3, 1, seed=4)),
    "entropy/masked-positions-0": _entropy_value(_logits, mask=_mask()),
    "entropy/all-masked": _entropy_value(_logits, mask=torch.zeros(2, 3, dtype=torch.bool)),
    "entropy/all--inf-row-nan": _entropy_value(lambda: _with_row([-math.inf] * V)),
    "entropy/all--inf-row-masked": _entropy_value(
        lambda: _with_row([-math.inf] * V), mask=_all_but((0, 1))
    ),
    "entropy/some--inf": _entropy_value(lambda: _with_row([-math.inf, 0.5, -math.inf, 2.0])),
    "entropy/one-finite-logit": _entropy_value(lambda: _with_row([3.0] + [-math.inf] * (V - 1))),
    # A NaN or +inf logit leaves its row no distribution: NaN, also in the reference.
    "entropy/nan-logit-row-nan": _entropy_value(lambda: _with_row([math.nan, 1.0])),
    "entropy/inf-logit-row-nan": _entropy_value(lambda: _with_row([math.inf, 1.0])),
    "entropy/nan-logit-row-masked": _entropy_value(
        lambda: _with_row([math.nan, 1.0]), mask=_all_but((0, 1))
    ),
    "entropy/float16": _entropy_value(lambda: _logits(torch.float16)),
    "entropy/bfloat16": _entropy_value(lambda: _logits(torch.bfloat16)),
    "entropy/float64-stays": _entropy_value(lambda: _logits(torch.float64), tolerance=FLOAT64),
    "entropy/float16-max": _entropy_value(lambda: torch.full((2, V), 65504.0, dtype=torch.float16)),
    "entropy/temperature-1e-38": _entropy_value(_logits, temperature=1e-38),
    "entropy/temperature-1e30": _entropy_value(_logits, temperature=1e30),
    "entropy/non-contiguous-rows": _entropy_value(lambda: randn(3, 4, V, seed=5)[:, ::2]),
    "entropy/fp32-extremes-two-blocks": _entropy_value(_two_block_extremes),
    "entropy/fp32-max-everywhere": _entropy_value(lambda: torch.full((2, V), 3.4e38)),
    # ---- logprobs_and_entropy: labels ----------------------------------------------------
    "logprobs/labels-float": _lpe_error(TypeError, "labels", labels=lambda: _labels().float()),
    "logprobs/labels-int8": _lpe_error(TypeError, "labels", labels=lambda: _labels(torch.int8)),
    "logprobs/labels-bool": _lpe_error(TypeError, "labels", labels=lambda: _labels() > 3),
    "logprobs/labels-list": _lpe_error(TypeError, "labels", labels=lambda: [[0, 1, 2]] * 2),
    "logprobs/labels-none": _lpe_error(TypeError, "labels", labels=lambda: None),
    "logprobs/labels-short": _lpe_error(ValueError, "labels", labels=lambda: _labels()[:, :2]),
    "logprobs/labels-with-vocab-dim": _lpe_error(
        ValueError, "labels", labels=lambda: torch.zeros(*SHAPE, dtype=torch.long)
    ),
    "logprobs/label-equals-vocab": _lpe_error(
        ValueError, "labels", labels=lambda: _labels().index_fill(1, torch.tensor([1]), V)
    ),
    "logprobs/label-negative": _lpe_error(ValueError, "labels", labels=lambda: _labels() - 20),
    "logprobs/label-huge": _lpe_error(ValueError, "labels", labels=lambda: _labels() + 2**40),
    "logprobs/label-padding-unmasked": _lpe_error(
        ValueError, "labels", labels=lambda: torch.full(SHAPE[:-1], -100)
    ),
    "logprobs/logits-int": _lpe_error(TypeError, "logits", logits=lambda: _logits().int()),
    "logprobs/temperature-nan": _lpe_error(ValueError, "temperature", temperature=math.nan),
    "logprobs/temperature-1e-39": _lpe_error(ValueError, "temperature", temperature=1e-39),
    "logprobs/mask-shape": _lpe_error(ValueError, "mask", mask=torch.ones(2, 2, dtype=torch.bool)),
    "logprobs/mask-float": _lpe_error(TypeError, "mask", mask=torch.ones(2, 3)),
    # ---- logprobs_and_entropy: documented values -----------------------------------------
    "logprobs/int32-labels": _lpe_value(_logits, lambda: _labels(torch.int32)),
    "logprobs/padding-where-masked": _lpe_value(
        _logits, lambda: torch.where(_mask(), _labels(), -100), mask=_mask()
    ),
    "logprobs/huge-label-where-masked": _lpe_value(
        _logits, lambda: torch.where(_mask(), _labels(), 2**40), mask=_mask()
    ),
    "logprobs/label-on--inf-logit": _lpe_value(
        lambda: _with_row([-math.inf, 1.0, 2.0], row=(0, 0)), lambda: torch.zeros(2, 3).long()
    ),
    "logprobs/all--inf-row-nan": _lpe_value(lambda: _with_row([-math.inf] * V), _labels),
    "logprobs/nan-logit-row-nan": _lpe_value(lambda: _with_row([1.0, math.nan]), _labels),
    "logprobs/inf-logit-row-nan": _lpe_value(lambda: _with_row([1.0, math.inf]), _labels),
    "logprobs/no-tokens": _lpe_value(
        lambda: torch.zeros(0, V), lambda: torch.zeros(0, dtype=torch.long)
    ),
    "logprobs/float16": _lpe_value(lambda: _logits(torch.float16), _labels),
    "logprobs/temperature-0.7": _lpe_value(_logits, _labels, temperature=0.7),
    "logprobs/compiled-out-of-range-label-nan": (
        _compiled_out_of_range_label,
        Returns(_compiled_expected),
    ),
}

CASES = table(ENTRY)
