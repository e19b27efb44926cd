"""Run registry cases outside pytest: one row (a dict) per case, skipped and failed included.

Inputs are built once per (op, shape) and shared by its providers and modes. A case that
runs out of memory or raises becomes a row with ``status`` "oom" / "error" and the message,
so one broken peer does not hide the rest of the table.
"""

from __future__ import annotations

import datetime
import gc
import sys
import time
from collections.abc import Callable

import torch

from saei_fast.benchmarks.cases import Case, prepare, skip_reason
from saei_fast.benchmarks.peaks import device_name
from saei_fast.benchmarks.timing import count_host_syncs, time_call


def run_info(device: torch.device) -> dict:
    """Device, date and versions, stored with every result."""
    import saei_fast

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "saei_fast": saei_fast.__version__,
    }


def _significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (tiny CPU rates must not round to 0)."""
    return float(f"{value:.{digits}g}")


def case_metrics(case: Case, median_ms: float, dtype: torch.dtype, peaks: dict | None) -> dict:
    """Bytes / FLOPs of ``case`` and the throughput and % of the measured peak they give."""
    seconds = median_ms / 1e3
    out: dict = {}
    moved = case.op.bytes_moved(case.dims, case.mode, dtype)
    flops = case.op.flops(case.dims, case.mode)
    if moved is not None:
        out["bytes_moved"] = moved
        out["GB/s"] = _significant(moved / seconds / 1e9)
        if peaks and peaks.get("copy_GBps"):
            out["pct_of_peak"] = _significant(100 * out["GB/s"] / peaks["copy_GBps"], 3)
    if flops is not None:
        out["flops"] = flops
        out["TFLOP/s"] = _significant(flops / seconds / 1e12)
        if case.provider.recomputes_forward and case.mode != "forward":
            executed = flops + flops // 2  # the forward's 2NDV again
            out["executed_TFLOP/s"] = _significant(executed / seconds / 1e12)
        if peaks and peaks.get("matmul_TFLOPs"):
            out["pct_of_peak"] = _significant(100 * out["TFLOP/s"] / peaks["matmul_TFLOPs"], 3)
    return out


def _base_row(case: Case, dtype: torch.dtype) -> dict:
    provider = case.provider
    return {
        "op": case.op.name,
        "provider": provider.name,
        "kind": provider.kind,
        "note": provider.note,
        "mode": case.mode,
        "shape": case.shape,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def run_cases(
    cases: list[Case],
    device: torch.device,
    *,
    quick: bool = False,
    peaks: dict | None = None,
    progress: Callable[[str], None] | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """Time every case; returns rows with timings, throughput, memory and "x ours" ratios.
    Cases not started by ``deadline`` (a ``time.monotonic()`` value) are reported as skipped."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    rows: list[dict] = []
    inputs_key, inputs = None, None
    for index, case in enumerate(cases, 1):
        dtype = case.op.dtype(device)
        row = _base_row(case, dtype)
        label = f"[{index}/{len(cases)}] {case.op.name} {case.shape} {case.mode}"
        label += f" {case.provider.name}"
        reason = skip_reason(case, device)
        if reason is None and deadline is not None and time.monotonic() > deadline:
            reason = "time budget of this run exhausted"
        if reason is not None:
            rows.append({**row, "status": "skipped", "reason": reason})
            progress(f"{label}: skipped ({reason})")
            continue
        try:
            if inputs_key != (case.op.name, case.dims):
                inputs_key, inputs = None, None  # free the last shape's inputs first
                gc.collect()
                inputs = case.op.build(case.dims, device, dtype)
                inputs_key = (case.op.name, case.dims)
            call = prepare(case, inputs)
            warmup, repeats = case.op.repeats(device, quick)
            warmup += case.provider.compile_calls
            timing, peak = time_call(call, device, warmup=warmup, repeats=repeats)
            counts_syncs = case.op.count_host_syncs and device.type == "cuda"
            syncs = count_host_syncs(call) if counts_syncs else None
        except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError needs torch 2.5
            rows.append({**row, "status": "oom", "reason": _short(error)})
            progress(f"{label}: out of memory")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        except Exception as error:  # a peer's API drift must not hide the other rows
            rows.append({**row, "status": "error", "reason": _short(error)})
            progress(f"{label}: error ({_short(error)})")
            continue
        row.update(
            status="ok",
            median_ms=round(timing.median_ms, 4),
            min_ms=round(timing.min_ms, 4),
            max_ms=round(timing.max_ms, 4),
            spread_pct=round(timing.spread_pct, 1),
            repeats=timing.repeats,
            peak_memory_MiB=round(peak / 2**20, 1),
            **case_metrics(case, timing.median_ms, dtype, peaks),
            **case.op.describe(inputs),
        )
        if syncs is not None:
            row["host_syncs"] = syncs
        rows.append(row)
        progress(f"{label}: {timing.median_ms:.3f} ms (spread {timing.spread_pct:.0f}%)")
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``x_ours``: a row's median over its reference provider's median, same op/shape/mode."""
    from saei_fast.benchmarks.cases import OPS

    medians = {
        (r["op"], r["shape"], r["mode"], r["provider"]): r["median_ms"]
        for r in rows
        if r.get("status") == "ok"
    }
    for r in rows:
        if r.get("status") != "ok":
            continue
        reference = OPS[r["op"]].providers[r["provider"]].compare_to
        base = medians.get((r["op"], r["shape"], r["mode"], reference))
        if base:
            r["x_ours"] = _significant(r["median_ms"] / base)
