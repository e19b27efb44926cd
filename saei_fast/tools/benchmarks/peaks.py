"""The device peaks a benchmark compares against, measured rather than taken from a datasheet.

- copy bandwidth: a device-to-device copy of a buffer much larger than the cache; bytes read
  plus bytes written per second. Memory-bound ops report "% of peak" against it.
- matmul throughput: a square matmul in the benchmark dtype (bf16 on CUDA, float32 on a CPU);
  GEMM-bound ops report "% of peak" against it.

On CUDA the first run measures (a few seconds) and caches the result per device name and
torch version in a small JSON file (``~/.cache/saei-fast/peaks.json`` unless a directory is
given); later runs reuse it. A CPU is measured on every run with small buffers: it is cheap,
and shared CPUs change from run to run.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch

from saei_fast.tools.benchmarks.timing import time_call


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "saei-fast"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def measure_copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` counting the read and the write."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing, _ = time_call(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    return 2 * n_bytes / (timing.median_ms / 1e3)


def measure_matmul_flops(device: torch.device, size: int, dtype: torch.dtype) -> float:
    """FLOP/s of a ``size`` x ``size`` x ``size`` matmul (2 * size**3 FLOPs)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    timing, _ = time_call(lambda: a @ b, device, warmup=2, repeats=10)
    return 2 * size**3 / (timing.median_ms / 1e3)


def measure_peaks(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    copy = measure_copy_bandwidth(device, (2048 if cuda else 64) * 2**20)
    matmul = measure_matmul_flops(device, 8192 if cuda else 1024, dtype)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "copy_GBps": round(copy / 1e9, 1),
        "matmul_TFLOPs": round(matmul / 1e12, 3),
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def device_peaks(
    device: torch.device, *, cache_dir: str | Path | None = None, refresh: bool = False
) -> dict:
    """Measured copy GB/s and matmul TFLOP/s of ``device`` (cached per CUDA device)."""
    if device.type != "cuda":
        return {**measure_peaks(device), "source": "measured in this run"}
    path = Path(cache_dir or default_cache_dir()) / "peaks.json"
    key = f"{device_name(device)} | torch {torch.__version__}"
    cached = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}  # a damaged cache is re-measured, not fatal
    if key in cached and not refresh:
        return {**cached[key], "source": f"cached in {path}"}
    peaks = measure_peaks(device)
    cached[key] = peaks
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass  # a read-only home still gets the numbers, just not the cache
    return {**peaks, "source": "measured in this run"}
