"""Glue between pytest-benchmark and the package's benchmark registry.

The cases (providers, shapes by device, inputs, bytes/FLOPs) live in
``saei_fast.tools.benchmarks`` so that ``pytest bench/`` and ``saei-fast bench`` time the same
calls; ``bench_case`` runs one of them under pytest-benchmark. CUDA timings synchronise, warm
up and evict the inputs from L2 before every round (outside the timed region); every case
records the device, versions, date, bytes moved or FLOPs, the throughput, the % of the
measured device peak and the peak extra memory in ``extra_info``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from saei_fast.memory import peak_memory_of
from saei_fast.tools.benchmarks.cases import Case, prepare, skip_reason
from saei_fast.tools.benchmarks.peaks import device_peaks
from saei_fast.tools.benchmarks.runner import case_metrics
from saei_fast.tools.benchmarks.runner import run_info as _run_info
from saei_fast.tools.benchmarks.timing import cache_flusher
from saei_fast.tools.benchmarks.timing import synchronized as _synchronized

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# SAEI_BENCH_QUICK=1: the `saei-fast bench --quick` shapes (one small shape per op).
QUICK = os.environ.get("SAEI_BENCH_QUICK", "") not in ("", "0")


def run_info() -> dict:
    return _run_info(DEVICE)


def synchronized(fn):
    """``fn`` followed by a device synchronisation, so the clock covers the kernels."""
    return _synchronized(fn, DEVICE)


@functools.cache
def peaks() -> dict:
    return device_peaks(DEVICE)


def run_benchmark(benchmark, fn, *, rounds: int | None = None, warmup: int | None = None):
    """Time ``fn`` with warm-up; CUDA runs are synchronised and start with a cold L2."""
    cpu = DEVICE.type == "cpu"
    flush = cache_flusher(DEVICE)
    return benchmark.pedantic(
        synchronized(fn),
        setup=flush if not cpu else None,
        rounds=rounds or (3 if cpu else 20),
        warmup_rounds=warmup if warmup is not None else (1 if cpu else 3),
        iterations=1,
    )


class _Inputs:
    """The inputs of the last (op, shape), shared by its providers and modes; one shape at a
    time so that large CUDA inputs are freed before the next are built."""

    key = None
    value = None

    @classmethod
    def get(cls, case: Case) -> dict:
        key = (case.op.name, case.dims)
        if cls.key != key:
            cls.key, cls.value = None, None
            cls.value = case.op.build(case.dims, DEVICE, case.op.dtype(DEVICE))
            cls.key = key
        return cls.value


def bench_case(benchmark, case: Case) -> dict:
    """Time one registry case under pytest-benchmark (skips with the registry's reason)."""
    reason = skip_reason(case, DEVICE)
    if reason is not None:
        pytest.skip(f"{case.provider.name}: {reason}")
    dtype = case.op.dtype(DEVICE)
    benchmark.group = f"{case.op.name} {case.mode} {case.shape} {str(dtype).removeprefix('torch.')}"
    inputs = _Inputs.get(case)
    call = prepare(case, inputs)
    warmup, rounds = case.op.repeats(DEVICE, False)
    # As in `saei-fast bench`: the peak memory is read on the last warm-up call, after any
    # compilation and the first call's one-off costs.
    for _ in range(max(0, warmup - 1) + case.provider.compile_calls):
        call()
    peak = peak_memory_of(call, DEVICE)
    run_benchmark(benchmark, call, rounds=rounds, warmup=0)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        return inputs
    metrics = case_metrics(case, benchmark.stats.stats.median * 1e3, dtype, peaks())
    benchmark.extra_info.update(run_info())
    benchmark.extra_info.update(
        provider=case.provider.name,
        kind=case.provider.kind,
        note=case.provider.note,
        mode=case.mode,
        shape=list(case.dims),
        dtype=str(dtype),
        peak_extra_memory_bytes=peak,
        device_peaks=peaks(),
        **metrics,
        **case.op.describe(inputs),
    )
    return inputs
