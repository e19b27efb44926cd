"""Band selection on a device: exactness against the reference, host syncs and timings.

For the GPU check script (``correctness(device)`` and ``timings(device)`` return lists of
dicts); inputs and providers are the benchmark registry's
(``saei_fast.tools.benchmarks.band_cases``). It also runs on a CPU with tiny shapes:
``python bench/gpu_band.py cpu`` (Triton cases then need ``TRITON_INTERPRET=1``).

Providers, each ``fn(entropy [B, T], mask [B, T]) -> bool [B, T]``:
  ours            saei_fast.entropy_band_mask (argument checks + the select; on CUDA the
                  value checks are device-side assertions, so no host sync)
  ours-nocheck    the registered op alone, as torch.compile runs it (no checks)
  ours-torch      our sort-based PyTorch path on the same device (the CPU implementation)
  torch-sort      per-row torch.sort + rank bounds (sequence scope)
  torch-quantile  torch.quantile thresholds over the valid tokens (batch scope; not the
                  band rule, the usual global-percentile baseline)
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time

import torch

import saei_fast
from saei_fast.ops.band.op import flat_segments
from saei_fast.ops.dispatch import triton_interpreting
from saei_fast.reference import entropy_band_mask_reference
from saei_fast.tools.benchmarks.band_cases import (
    BAND,
    CUDA_SHAPES,
    SCOPED_PROVIDERS,
    band_inputs,
    band_provider,
    count_host_syncs,
)

# Inputs, providers and shapes are the benchmark registry's, so this script, `pytest bench/`
# and `saei-fast bench` time the same calls.
CPU_SHAPES = [(8, 256), (4, 1024)]
CASES = SCOPED_PROVIDERS


def provider(name: str, scope: str, impl: str):
    """The function timed for ``name`` at ``scope``."""
    return band_provider(name, scope, impl)


def median_ms(fn, device: torch.device, *, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of ``fn()`` in ms, synchronised on CUDA."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# -------------------------------------------------------------------------------------------
# Correctness
# -------------------------------------------------------------------------------------------


def _row(case: str, got: torch.Tensor, expected: torch.Tensor) -> dict:
    mismatches = int((got.cpu() != expected.cpu()).sum())
    return {"op": "entropy_band_mask", "case": case, "mismatches": mismatches,
            "ok": mismatches == 0}  # fmt: skip


def _kernel(entropy, mask, scope, group_size, schedule, cu_seqlens=None):
    from saei_fast.kernels.band.launch import band_select

    values, valid, seg_len, bounds = flat_segments(entropy, mask, cu_seqlens, scope, group_size)
    return band_select(values, valid, *BAND, seg_len=seg_len, bounds=bounds, schedule=schedule)


def correctness(device: str) -> list[dict]:
    """Exact agreement with the reference on both schedules, both layouts, all scopes, ties,
    long rows; plus the host-sync counts (0 for the public op, checks included, and for the
    bare op)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    shapes = [(64, 4096), (4, 32768), (3, 5000)] if cuda else [(4, 300), (2, 1100)]
    # Off CUDA the kernels only run in Triton's interpreter; without it, the public op
    # (the PyTorch path there) is all that can be checked.
    schedules = ("segment", "chunked") if cuda or triton_interpreting() else ()
    rows = []
    for rows_, width in shapes:
        for kind in ("continuous", "ties"):
            entropy, mask = band_inputs(rows_, width, device, seed=rows_ + width, kind=kind)
            packed, counts = entropy[mask], mask.sum(-1)
            cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
            for scope in ("sequence", "group", "batch"):
                group_size = 2 if scope == "group" and rows_ % 2 == 0 else 1
                if scope == "group" and rows_ % 2:
                    continue
                expected = entropy_band_mask_reference(
                    entropy.cpu(), mask.cpu(), band=BAND, scope=scope, group_size=group_size
                )
                name = f"{scope} {rows_}x{width} {kind}"
                public = saei_fast.entropy_band_mask(
                    entropy, mask, band=BAND, scope=scope, group_size=group_size
                )
                rows.append(_row(f"{name} public", public, expected))
                for schedule in schedules:
                    got = _kernel(entropy, mask, scope, group_size, schedule)
                    rows.append(_row(f"{name} {schedule}", got.view(mask.shape), expected))
                    got = _kernel(packed, None, scope, group_size, schedule, cu_seqlens)
                    rows.append(_row(f"{name} packed {schedule}", got, expected[mask.cpu()]))
    if cuda:
        entropy, mask = band_inputs(64, 4096, device)
        scoped = [("ours", "sequence"), ("ours", "group"), ("ours-nocheck", "batch")]
        for name, scope in scoped:
            call = functools.partial(provider(name, scope, "triton"), entropy, mask)
            call()  # compile outside the count
            syncs = count_host_syncs(call)
            rows.append({"op": "entropy_band_mask", "case": f"host syncs {name} {scope}",
                         "host_syncs": syncs, "ok": syncs == 0})  # fmt: skip
    return rows


# -------------------------------------------------------------------------------------------
# Timings
# -------------------------------------------------------------------------------------------


def timings(device: str) -> list[dict]:
    """Median ms per provider and shape, with valid tokens, Mtoken/s and host syncs."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    impl = "triton" if cuda else "torch"
    results = []
    for rows_, width in CUDA_SHAPES if cuda else CPU_SHAPES:
        entropy, mask = band_inputs(rows_, width, device)
        tokens = int(mask.sum())
        for name, scope in CASES:
            call = functools.partial(provider(name, scope, impl), entropy, mask)
            ms = median_ms(call, device, reps=20 if cuda else 5)
            results.append(
                {
                    "op": "entropy_band_mask",
                    "provider": name,
                    "scope": scope,
                    "shape": f"{rows_}x{width}",
                    "ms": round(ms, 4),
                    "valid_tokens": tokens,
                    "Mtoken/s": round(tokens / ms / 1e3, 1),
                    "host_syncs": count_host_syncs(call),
                }
            )
    return results


if __name__ == "__main__":
    where = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    if where == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for row in correctness(where) + timings(where):
        print(row)
