"""Timing that a benchmark table can be trusted with.

CUDA: every repetition is bracketed by CUDA events after a synchronisation, and the L2 cache
is overwritten before it (a buffer twice the L2 size is zeroed outside the timed region, as
``triton.testing.do_bench`` does), so small inputs are read from HBM as they would be in a
training step rather than from a warm cache. Warm-up calls absorb compilation and
autotuning. CPU: wall clock around each call. The median is reported with min and max.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saei_fast.memory import peak_memory_of


@dataclass(frozen=True)
class Timing:
    """Milliseconds of ``repeats`` timed calls."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how noisy the measurement was."""
        return 100.0 * (self.max_ms - self.min_ms) / self.median_ms if self.median_ms else 0.0


def _l2_flusher(device: torch.device) -> Callable[[], None]:
    if device.type != "cuda":
        return lambda: None
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 2**26
    buffer = torch.empty(2 * l2_bytes, dtype=torch.int8, device=device)
    return buffer.zero_


def cache_flusher(device: torch.device) -> Callable[[], None]:
    """A function that evicts the inputs from the device cache (a no-op off CUDA) and returns
    None, so it can be pytest-benchmark's ``setup`` (the flush stays outside the timing)."""
    flush = _l2_flusher(device)

    def setup() -> None:
        flush()

    return setup


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation, so a wall clock covers the kernels."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def time_call(
    fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int
) -> tuple[Timing, int]:
    """Median, min and max milliseconds of ``fn()`` after ``warmup`` untimed calls, and the
    extra bytes one call needs at its peak (``saei_fast.memory``), read on the last warm-up
    call (or on one more call when ``warmup`` is 0) so it costs no extra call.

    On a CPU the peak is the process's RSS high-water mark: memory the allocator kept from
    earlier calls is reused and not counted, so there it is a lower bound."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup - 1):
        fn()
    peak = peak_memory_of(fn, device)
    samples = []
    if device.type == "cuda":
        flush = _l2_flusher(device)
        for _ in range(repeats):
            flush()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    timing = Timing(statistics.median(samples), min(samples), max(samples), repeats)
    return timing, peak


def count_host_syncs(fn) -> int | None:
    """Synchronising CUDA calls made by ``fn()`` (None off CUDA)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
