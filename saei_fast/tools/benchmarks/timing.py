"""Timing that a benchmark table can be trusted with.

CUDA: every repetition is bracketed by CUDA events after a synchronisation, and the L2 cache
is overwritten before it (a buffer twice the L2 size is zeroed outside the timed region, as
``triton.testing.do_bench`` does), so small inputs are read from HBM as they would be in a
training step rather than from a warm cache. Warm-up calls absorb compilation and
autotuning. CPU: wall clock around each call. The median is reported with min and max.

On a shared machine the load changes from one second to the next, so providers compared
with each other are timed in interleaved rounds (``interleaved``: every provider once per
round, round after round) rather than one after the other, and a ratio whose two
min-max ranges overlap is flagged as noisy (``spreads_overlap``).
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
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


def warm_up(fn: Callable[[], object], device: torch.device, warmup: int) -> int:
    """Run ``fn`` ``warmup`` times (at least once) and return the extra bytes the last call
    needed at its peak (``saei_fast.memory``; on a CPU a lower bound, see ``time_call``)."""
    for _ in range(warmup - 1):
        fn()
    return peak_memory_of(fn, device)


def _time_once(fn: Callable[[], object], device: torch.device, flush) -> float:
    if device.type == "cuda":
        flush()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> tuple[dict[str, Timing], dict[str, BaseException]]:
    """Time already warmed-up ``fns`` in ``repeats`` rounds, each calling every function
    once, so that a burst of load from other work hits all of them alike. A function that
    raises is dropped from the later rounds; its error is returned instead of a timing."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    flush = _l2_flusher(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    errors: dict[str, BaseException] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                samples[name].append(_time_once(fn, device, flush))
            except Exception as error:  # reported in its row, the others go on
                errors[name] = error
    timings = {
        name: Timing(statistics.median(t), min(t), max(t), len(t))
        for name, t in samples.items()
        if name not in errors
    }
    return timings, errors


def spreads_overlap(a: dict, b: dict) -> bool:
    """Whether two rows' ``[min_ms, max_ms]`` ranges overlap: then which one is faster is
    not settled by this run, whatever the ratio of the medians says."""
    return a["min_ms"] <= b["max_ms"] and b["min_ms"] <= a["max_ms"]


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` processes that each spin on a core until the block exits: an oversubscribed
    machine on purpose, to see how a CPU path holds up under load (``--busy``)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


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
