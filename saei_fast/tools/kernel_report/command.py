"""``saei-fast kernels``: compile every kernel for a GPU target and report on the binaries."""

from __future__ import annotations

import argparse
import sys

from saei_fast.tools.kernel_report.compile import OP_MODULES

ARCHES = ("sm_90", "sm_80", "gfx942", "gfx90a")


def add_kernels_parser(commands) -> None:
    parser = commands.add_parser(
        "kernels",
        help="compile every kernel for a GPU (no GPU needed) and report registers, spills, "
        "load widths, MMA use, instructions per element, waves and roofline estimates",
    )
    parser.add_argument("--arch", required=True, help=f"one of {', '.join(ARCHES)}")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md, binaries")
    parser.add_argument(
        "--ops",
        default=",".join(OP_MODULES),
        help=f"comma-separated subset of {','.join(OP_MODULES)}",
    )
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.set_defaults(run=kernels)


def _error(message: str) -> int:
    print(f"saei-fast kernels: error: {message}", file=sys.stderr)
    return 2


def kernels(args: argparse.Namespace) -> int:
    """Compile the benchmark plans; 0 when every module had plans and every plan compiled."""
    if args.arch not in ARCHES:
        return _error(f"--arch must be one of {', '.join(ARCHES)}, got {args.arch!r}")
    ops = tuple(op.strip() for op in args.ops.split(",") if op.strip())
    unknown = [op for op in ops if op not in OP_MODULES]
    if unknown or not ops:
        return _error(f"--ops must be a comma-separated subset of {','.join(OP_MODULES)}")
    if args.jobs < 1:
        return _error(f"--jobs must be >= 1, got {args.jobs}")
    from saei_fast.tools.kernel_report.build import build_report

    try:
        records, problems = build_report(
            args.arch, args.out, ops, jobs=args.jobs, progress=lambda s: print(s, flush=True)
        )
    except OSError as error:  # an unwritable --out
        return _error(f"--out: {error}")
    print(f"wrote {len(records)} records to {args.out}/report.json and report.md")
    for problem in problems:
        print(f"saei-fast kernels: not reported: {problem}", file=sys.stderr)
    return 1 if problems else 0
