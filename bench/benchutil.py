"""Helpers shared by the benchmark suites and the GPU check script.

Shapes are chosen by device: on a CPU the suites run in a few minutes; on CUDA they use
real RL shapes. Every case records the device, versions and date in ``extra_info`` so runs
can be compared later, and CUDA timings synchronise before the clock is read.
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

import saei_fast

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "saei_fast": saei_fast.__version__,
    }


def synchronized(fn):
    """``fn`` followed by a device synchronisation, so the clock covers the kernels."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out

    return run


def record(benchmark, *, bytes_moved: int | None = None, flops: int | None = None, **extra):
    """Fill ``extra_info`` with the run description and the derived throughput."""
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(run_info())
    benchmark.extra_info.update(extra)
    if bytes_moved is not None:
        benchmark.extra_info["bytes_moved"] = bytes_moved
        benchmark.extra_info["GB/s"] = round(bytes_moved / median / 1e9, 2)
    if flops is not None:
        benchmark.extra_info["TFLOP/s"] = round(flops / median / 1e12, 3)


def run_benchmark(benchmark, fn, *, rounds: int | None = None):
    """Time ``fn`` with warm-up; CUDA runs are synchronised."""
    timed = synchronized(fn)
    cpu = DEVICE.type == "cpu"
    return benchmark.pedantic(
        timed, rounds=rounds or (3 if cpu else 20), warmup_rounds=1 if cpu else 3, iterations=1
    )
