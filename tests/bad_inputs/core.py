"""Outcome classes of the catalogue and the checks that hold an observation to them.

Every entry has one of two outcomes: a clear error (:class:`Raises`: a ``TypeError`` or
``ValueError`` whose message names the argument) or the documented value (:class:`Returns`,
built from the float64 reference or a documented constant). Anything else fails: another
exception class, an error that does not say which argument is wrong, a value where an error
was due, or a value that differs from the documented one (NaN where it should be a number,
or a number where it should be NaN).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The two implementations of a dispatching op; "triton" runs in Triton's CPU interpreter on a
# machine without a GPU (tests/conftest.py sets TRITON_INTERPRET=1).
IMPLS = ("torch", "triton")


@dataclass(frozen=True)
class Raises:
    """A clear error: an instance of ``error`` whose message matches ``names`` (a regular
    expression for the argument the message must name)."""

    error: type[Exception]
    names: str


@dataclass(frozen=True)
class Returns:
    """The documented value: ``expected()`` builds it (tensors in float64, or whatever the
    result holds). Tensors are compared in float64 within ``atol`` / ``rtol`` with NaN
    exactly where the expected value has NaN, and each tensor of the result must have
    ``dtype`` (one dtype for all, or one per tensor in flattened order; None: unchecked)."""

    expected: Callable[[], object]
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = torch.float32
    atol: float = 2e-5
    rtol: float = 1e-5


Outcome = Raises | Returns


@dataclass(frozen=True)
class Case:
    """One entry: ``call(impl)`` runs a public function on the bad input.

    ``impl`` is ``"torch"`` or ``"triton"`` for the ops that dispatch (each entry runs on
    both, and the two observations must agree) and None for everything else. ``triton``
    overrides the outcome on the Triton path where the documentation says the paths differ.
    """

    id: str
    call: Callable[[str | None], object]
    outcome: Outcome
    dispatches: bool = True
    triton: Outcome | None = None

    def outcome_for(self, impl: str | None) -> Outcome:
        if impl == "triton" and self.triton is not None:
            return self.triton
        return self.outcome


# Tolerances against the float64 reference: float32 results (those of test_entropy.py and
# test_linear_entropy.py), and float64 results (float64 inputs run the PyTorch path in float64).
FLOAT32 = {"dtype": torch.float32, "atol": 2e-5, "rtol": 1e-5}
FLOAT64 = {"dtype": torch.float64, "atol": 1e-12, "rtol": 1e-12}


def table(entries: dict[str, tuple], *, dispatches: bool = True) -> list[Case]:
    """Cases from ``{id: (call, outcome)}`` or ``{id: (call, outcome, triton_outcome)}``."""
    return [
        Case(name, entry[0], entry[1], dispatches, entry[2] if len(entry) > 2 else None)
        for name, entry in entries.items()
    ]


def observe(case: Case, impl: str | None) -> object:
    """What the call returned, or the exception it raised."""
    try:
        return case.call(impl)
    except Exception as error:  # the class of the exception is what is checked
        return error


def check_outcome(outcome: Outcome, observed: object, where: str) -> None:
    """Fail unless ``observed`` (a value or an exception) is ``outcome``."""
    if isinstance(outcome, Raises):
        if not isinstance(observed, Exception):
            raise AssertionError(
                f"{where}: expected {outcome.error.__name__} naming {outcome.names!r}, "
                f"got the value {observed!r}"
            )
        if not isinstance(observed, outcome.error):
            raise AssertionError(
                f"{where}: expected {outcome.error.__name__} naming {outcome.names!r}, got "
                f"{type(observed).__name__}: {observed}"
            ) from observed
        if not re.search(outcome.names, str(observed)):
            raise AssertionError(
                f"{where}: the {type(observed).__name__} does not name {outcome.names!r}: "
                f"{observed}"
            ) from observed
        return
    if isinstance(observed, Exception):
        raise AssertionError(
            f"{where}: expected the documented value, got {type(observed).__name__}: {observed}"
        ) from observed
    actual, expected = flatten(observed), flatten(outcome.expected())
    if len(actual) != len(expected):
        raise AssertionError(f"{where}: got {len(actual)} results, expected {len(expected)}")
    dtypes = outcome.dtype if isinstance(outcome.dtype, tuple) else (outcome.dtype,) * len(actual)
    for index, (got, want, dtype) in enumerate(zip(actual, expected, dtypes, strict=True)):
        label = f"{where} result {index}"
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor), f"{label}: expected a tensor, got {got!r}"
            if dtype is not None:
                assert got.dtype == dtype, f"{label}: dtype {got.dtype}, documented {dtype}"
            assert_tensors_close(got, want, label, atol=outcome.atol, rtol=outcome.rtol)
        else:
            assert got == want, f"{label}: got {got!r}, expected {want!r}"


def check_agree(case: Case, by_impl: dict[str, object]) -> None:
    """The two paths give the same outcome: the same error class and message, or values
    with the same dtype, shape and NaN pattern, within the entry's tolerance."""
    if case.triton is not None:  # documented to differ
        return
    first, second = (by_impl[impl] for impl in IMPLS)
    where = f"{case.id}: torch vs triton"
    if isinstance(first, Exception) or isinstance(second, Exception):
        assert type(first) is type(second), f"{where}: {first!r} vs {second!r}"
        assert str(first) == str(second), f"{where}: {first} vs {second}"
        return
    tolerance = case.outcome if isinstance(case.outcome, Returns) else Returns(lambda: None)
    for index, (a, b) in enumerate(zip(flatten(first), flatten(second), strict=True)):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype, f"{where} result {index}: {a.dtype} vs {b.dtype}"
            assert_tensors_close(
                a, b, f"{where} result {index}", atol=tolerance.atol, rtol=tolerance.rtol
            )
        else:
            assert a == b, f"{where} result {index}: {a!r} vs {b!r}"


def assert_tensors_close(
    actual: torch.Tensor, expected: torch.Tensor, where: str, *, atol: float, rtol: float
) -> None:
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{where}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    if actual.dtype == torch.bool or expected.dtype == torch.bool:
        assert torch.equal(actual, expected.to(actual.dtype)), f"{where}: {actual} != {expected}"
        return
    got, want = actual.detach().double(), expected.detach().double()
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), (
        f"{where}: NaN at {nan_got.nonzero().tolist()}, expected at {nan_want.nonzero().tolist()}"
    )
    torch.testing.assert_close(
        got, want, atol=atol, rtol=rtol, equal_nan=True, msg=lambda text: f"{where}: {text}"
    )


def flatten(value: object) -> list:
    """The leaves of nested tuples / lists, in order (a lone value is one leaf)."""
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in flatten(item)]
    return [value]


# -------------------------------------------------------------------------------------------
# Seeded inputs
# -------------------------------------------------------------------------------------------


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal values from a generator seeded with ``seed`` (drawn in float64, then
    rounded to ``dtype``, so the same seed gives the same numbers in every dtype)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def randint(high: int, *shape: int, seed: int = 0, dtype: torch.dtype = torch.int64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=generator).to(dtype)


def bernoulli_mask(*shape: int, seed: int = 0) -> torch.Tensor:
    """A bool mask with some True and some False (first entry True, last False)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=generator) < 0.6
    flat = mask.view(-1)
    flat[0], flat[-1] = True, False
    return mask
