"""Peak-memory measurement for ops, benchmarks and the attack's statistics.

On CUDA the caching allocator's own peak counter is exact. On the CPU there is no allocator
counter, so the resident-set high-water mark of the process is used: Linux lets a process
reset it (``/proc/self/clear_refs``), so the peak of one call can be read without the history
before it. Memory the allocator kept from earlier work and reuses does not show up as new
RSS, which is why the benchmarks measure in a fresh subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int:
    with open(_STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in {_STATUS}")


def rss_tracking_available() -> bool:
    """True where the process's RSS high-water mark can be reset (Linux)."""
    return os.path.exists("/proc/self/clear_refs") and os.path.exists(_STATUS)


@dataclass
class PeakMemory:
    """Filled in when the ``track_peak_memory`` block exits."""

    bytes: int = 0
    source: str = ""


@contextlib.contextmanager
def track_peak_memory(device: torch.device | str | None = None) -> Iterator[PeakMemory]:
    """Measure the extra memory a block needs at its peak, in bytes.

    CUDA: ``max_memory_allocated`` above what was allocated on entry. CPU: RSS high-water
    mark above the RSS on entry (Linux only; elsewhere ``bytes`` stays 0 and ``source`` says
    ``"unavailable"``).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = max(0, torch.cuda.max_memory_allocated(device) - start)
        result.source = "cuda.max_memory_allocated"
        return
    if not rss_tracking_available():
        result.source = "unavailable"
        yield result
        return
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    start = _status_kib("VmRSS")
    yield result
    result.bytes = max(0, _status_kib("VmHWM") - start) * 1024
    result.source = "rss-high-water"


def peak_memory_of(fn: Callable[[], object], device: torch.device | str | None = None) -> int:
    """Extra bytes ``fn()`` needs at its peak (see :func:`track_peak_memory`)."""
    with track_peak_memory(device) as peak:
        fn()
    return peak.bytes


def run_isolated(code: str, *args: object, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` with ``args`` as ``sys.argv[1:]`` in a fresh interpreter and return the
    JSON object its last line of output prints.

    A fresh process is how peak memory is measured honestly on the CPU: memory the allocator
    kept from earlier work cannot hide a new allocation there. ``env`` adds or overrides
    environment variables.
    """
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        env=None if env is None else {**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
