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

from saei_fast.tools.benchmarks.cases import Case, prepare, skip_reason
from saei_fast.tools.benchmarks.peaks import device_name
from saei_fast.tools.benchmarks.timing import (
    count_host_syncs,
    interleaved,
    spreads_overlap,
    warm_up,
)


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

    Cases of the same op, shape and mode are timed together: each is warmed up (compiling,
    and reading its peak memory on the last warm-up call), then all of them are timed in
    interleaved rounds. Cases not started by ``deadline`` (a ``time.monotonic()`` value)
    are reported as skipped."""
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    rows: list[dict] = []
    inputs = _InputCache(device)
    groups: dict[tuple, list[tuple[int, Case]]] = {}
    for index, case in enumerate(cases, 1):
        groups.setdefault((case.op.name, case.dims, case.mode), []).append((index, case))
    for group in groups.values():
        rows.extend(_run_group(group, len(cases), device, quick, peaks, progress, deadline, inputs))
    add_ratios(rows)
    return rows


class _InputCache:
    """The inputs of the last (op, shape), shared by its providers and modes; one shape at
    a time, so that large inputs are freed before the next are built."""

    def __init__(self, device: torch.device):
        self.device, self.key, self.value = device, None, None

    def get(self, case: Case, dtype: torch.dtype) -> dict:
        if self.key != (case.op.name, case.dims):
            self.key, self.value = None, None
            gc.collect()
            self.value = case.op.build(case.dims, self.device, dtype)
            self.key = (case.op.name, case.dims)
        return self.value


def _failure(row: dict, error: BaseException, device: torch.device) -> dict:
    if isinstance(error, torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError needs 2.5
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "oom", "reason": _short(error)}
    return {**row, "status": "error", "reason": _short(error)}


def _run_group(group, total, device, quick, peaks, progress, deadline, inputs) -> list[dict]:
    """Rows for the cases of one (op, shape, mode), in their order."""
    rows: dict[int, dict] = {}
    ready: dict[int, tuple] = {}  # index -> (case, call, peak, syncs)
    for index, case in group:
        dtype = case.op.dtype(device)
        row = _base_row(case, dtype)
        label = f"[{index}/{total}] {case.op.name} {case.shape} {case.mode} {case.provider.name}"
        reason = skip_reason(case, device)
        if reason is None and deadline is not None and time.monotonic() > deadline:
            reason = "time budget of this run exhausted"
        if reason is not None:
            rows[index] = {**row, "status": "skipped", "reason": reason}
            progress(f"{label}: skipped ({reason})")
            continue
        try:
            case_inputs = inputs.get(case, dtype)
            call = prepare(case, case_inputs)
            warmup, _ = case.op.repeats(device, quick)
            peak = warm_up(call, device, warmup + case.provider.compile_calls)
            counts_syncs = case.op.count_host_syncs and device.type == "cuda"
            syncs = count_host_syncs(call) if counts_syncs else None
        except Exception as error:  # a peer's API drift must not hide the other rows
            rows[index] = _failure(row, error, device)
            progress(f"{label}: {rows[index]['status']} ({_short(error)})")
            continue
        rows[index] = row
        ready[index] = (case, call, peak, syncs)
    if ready:
        _, repeats = group[0][1].op.repeats(device, quick)
        calls = {index: entry[1] for index, entry in ready.items()}
        timings, errors = interleaved(calls, device, repeats)
        for index, (case, _, peak, syncs) in ready.items():
            label = f"[{index}/{total}] {case.op.name} {case.shape} {case.mode}"
            label += f" {case.provider.name}"
            if index in errors:
                rows[index] = _failure(rows[index], errors[index], device)
                progress(f"{label}: {rows[index]['status']} ({_short(errors[index])})")
                continue
            timing = timings[index]
            dtype = case.op.dtype(device)
            rows[index].update(
                status="ok",
                median_ms=round(timing.median_ms, 4),
                min_ms=round(timing.min_ms, 4),
                max_ms=round(timing.max_ms, 4),
                spread_pct=round(timing.spread_pct, 1),
                repeats=timing.repeats,
                peak_memory_MiB=round(peak / 2**20, 1),
                **case_metrics(case, timing.median_ms, dtype, peaks),
                **case.op.describe(inputs.get(case, dtype)),
            )
            if syncs is not None:
                rows[index]["host_syncs"] = syncs
            progress(f"{label}: {timing.median_ms:.3f} ms (spread {timing.spread_pct:.0f}%)")
    return [rows[index] for index, _ in group]


def add_ratios(rows: list[dict]) -> None:
    """``x_ours``: a row's median over its reference provider's median, same op/shape/mode;
    ``noisy``: True when the two rows' min-max ranges overlap (the run does not settle which
    is faster, whatever the ratio)."""
    from saei_fast.tools.benchmarks.registry import OPS

    ok = {
        (r["op"], r["shape"], r["mode"], r["provider"]): r for r in rows if r.get("status") == "ok"
    }
    for r in rows:
        if r.get("status") != "ok":
            continue
        reference = OPS[r["op"]].providers[r["provider"]].compare_to
        base = ok.get((r["op"], r["shape"], r["mode"], reference))
        if base and base["median_ms"]:
            r["x_ours"] = _significant(r["median_ms"] / base["median_ms"])
            if base is not r:
                r["noisy"] = spreads_overlap(r, base)
