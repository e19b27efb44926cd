"""``saei-fast bench``: the registry's cases outside pytest, one table per op, CSV and JSON."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _split(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None stays None, but ``","`` or ``" "`` gives ``[]`` (an
    option given with nothing in it is an error, not the default)."""
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _error(message: str) -> int:
    print(f"saei-fast bench: error: {message}", file=sys.stderr)
    return 2


def _providers_epilog() -> str:
    from saei_fast.tools.benchmarks.registry import OPS

    lines = ["ops, their shape dimensions and providers (for --ops, --shapes, --providers):"]
    for name, op in OPS.items():
        lines.append(f"  {name} ({' x '.join(op.dims)}): {', '.join(op.providers)}")
    return "\n".join(lines)


def add_bench_parser(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="time every op against naive, chunked and compiled PyTorch and the installed peers",
        description="Time every op per provider (ours, PyTorch baselines, installed peers; "
        "missing peers are listed as skipped with the reason), print one table per op and "
        "write bench.csv, bench.json and bench.md.",
        epilog=_providers_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="one small shape per op")
    parser.add_argument(
        "--ops",
        default=None,
        help="comma-separated subset of the ops listed below (default: all)",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated shapes replacing the defaults, e.g. entropy:512x32000 (N x V), "
        "linear_entropy:256x256x32000 (N x D x V), band:16x4096 (B x T), attack:4x64 "
        "(rows x completion); without the op: prefix a shape applies to the --ops with that "
        "many dims",
    )
    parser.add_argument("--providers", default=None, help="comma-separated providers to keep")
    parser.add_argument(
        "--out", default="bench-out", help="directory for bench.csv/json/md (default bench-out)"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 avoids OpenMP spin-waits "
        "that dominate small ops on an oversubscribed CPU",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="start this many busy-looping processes for the run (a deliberately "
        "oversubscribed machine, to compare against a quiet run)",
    )
    parser.add_argument(
        "--refresh-peaks", action="store_true", help="re-measure the cached CUDA peaks"
    )
    parser.set_defaults(run=bench)


def bench(args: argparse.Namespace) -> int:
    import torch

    from saei_fast.tools.benchmarks.peaks import device_peaks
    from saei_fast.tools.benchmarks.registry import cases_for
    from saei_fast.tools.benchmarks.report import tables, write_outputs
    from saei_fast.tools.benchmarks.runner import run_cases, run_info
    from saei_fast.tools.benchmarks.timing import busy_processes

    device_text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return _error(f"--device must be cpu or cuda, got {device_text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda, but no CUDA device is available")
    if args.threads is not None and args.threads < 1:
        return _error(f"--threads must be >= 1, got {args.threads}")
    if args.busy < 0:
        return _error(f"--busy must be >= 0, got {args.busy}")
    out = Path(args.out)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # checked now, not after every case has run
        return _error(f"--out {args.out!r}: {str(blocking)!r} is a file, not a directory")
    for option in ("ops", "shapes", "providers"):
        if getattr(args, option) is not None and not _split(getattr(args, option)):
            return _error(f"--{option} is empty: leave it out for the default, or name one")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        cases = cases_for(
            _split(args.ops),
            device,
            quick=args.quick,
            shapes=_split(args.shapes),
            providers=_split(args.providers),
        )
    except ValueError as error:
        return _error(str(error))
    if not cases:
        return _error("no case matches --ops/--shapes/--providers")
    start = time.perf_counter()
    print(f"measuring {device} peaks ...", file=sys.stderr, flush=True)
    peaks = device_peaks(device, refresh=args.refresh_peaks)
    with busy_processes(args.busy):
        rows = run_cases(cases, device, quick=args.quick, peaks=peaks)
    info = {**run_info(device), "busy_processes": args.busy, "threads": torch.get_num_threads()}
    print(tables(rows, info, peaks))
    paths = write_outputs(args.out, rows, info, peaks)
    print(
        f"wrote {paths['csv']}, {paths['json']}, {paths['md']} "
        f"({len(rows)} cases in {time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1
