"""The ``saei-fast`` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

# Public ops that dispatch between the Triton kernels and the PyTorch path, in the order a
# reader meets them in SaEI; `info` reports the backend each one uses here.
DISPATCHED_OPS = (
    "entropy",
    "logprobs_and_entropy",
    "linear_entropy",
    "linear_logprobs_and_entropy",
    "entropy_band_mask",
)
# What `info` lists: the kernels' compiler, the integrations' stacks, and the peers the
# benchmarks compare against (each shown as "not installed" when absent).
OPTIONAL_PACKAGES = (
    "triton",
    "numpy",
    "transformers",
    "trl",
    "accelerate",
    "datasets",
    "peft",
    "verl",
    "pillow",
    "matplotlib",
    "flash-attn",
    "liger-kernel",
    "cut-cross-entropy",
)
_LABEL = max(len(name) for name in (*OPTIONAL_PACKAGES, "saei-fast", "python"))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_status() -> str:
    from saei_fast.ops.dispatch import triton_available, triton_interpreting

    if not triton_available():
        return "not importable (PyTorch path only)"
    import torch

    if torch.cuda.is_available():
        return "usable on CUDA"
    if triton_interpreting():
        return "CPU interpreter (TRITON_INTERPRET=1): exact but slow"
    return "installed; no CUDA device, so kernels run only under TRITON_INTERPRET=1"


def _target_line(device) -> str:
    """The GPU target the launchers choose configurations for on ``device``."""
    from saei_fast.ops.dispatch import kernel_options

    target = kernel_options().target(device)  # honours SAEI_TARGET, as the launches do
    units = "CUs" if target.is_amd else "SMs"
    line = f"{target.name}, {target.sm_count} {units}, warp size {target.warp_size}"
    if device.type != "cuda":  # the interpreter runs the kernels with this target's choices
        line += " (no GPU: the configuration the kernels are interpreted with)"
    return line


def info(_args: argparse.Namespace) -> int:
    """Print versions, devices and the backend each op uses on this machine; an invalid
    ``SAEI_IMPL`` (every op would fail with it) is a user error, reported before anything."""
    import torch

    import saei_fast
    from saei_fast.ops.dispatch import resolve_impl

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        backend = resolve_impl(None, device)
    except ValueError as error:
        return fail("info", str(error))

    def row(label: str, value: str) -> None:
        print(f"{label:<{_LABEL}}  {value}")

    row("saei-fast", saei_fast.__version__)
    row("python", f"{platform.python_version()} ({sys.executable})")
    row("torch", torch.__version__)
    for name in OPTIONAL_PACKAGES:
        row(name, _version(name))
    if device.type == "cuda":
        # A ROCm build of torch exposes AMD GPUs as "cuda" devices.
        vendor = "ROCm" if getattr(torch.version, "hip", None) else "CUDA"
        row("device", f"{vendor}: {torch.cuda.get_device_name(device)}")
    else:
        row("device", f"CPU only ({platform.machine()}, no CUDA or ROCm device)")
    row("kernels", _triton_status())
    row("target", _target_line(device))
    print("\nbackend per op for tensors on this machine's default device:")
    for op in DISPATCHED_OPS:
        if hasattr(saei_fast, op):
            print(f"  {op:<30} {backend}")
    return 0


def fail(command: str | None, message: str) -> int:
    """Report a user error as one line ``saei-fast <command>: error: ...`` on stderr and
    return the exit status for it (2, as argparse does)."""
    prog = "saei-fast" if command is None else f"saei-fast {command}"
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are the one line ``<prog>: error: ...`` with exit
    status 2 (argparse prints its usage lines first). Subcommand parsers are created with the
    top-level parser's class, so every subcommand reports its flag errors this way."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The subcommand parsers by name (filled on the top-level parser by build_parser).
        self.subcommands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="saei-fast",
        description="Fused kernels and drop-in ops for SaEI (selective-adversarial entropy "
        "intervention) in GRPO trainers for vision-language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    parser.add_argument("--version", action="version", version=f"saei-fast {_version('saei-fast')}")
    info_parser = commands.add_parser(
        "info",
        help="versions, devices, and the backend each op uses on this machine",
        description="Print the versions of saei-fast, Python, torch and the optional packages "
        "(integrations and benchmark peers), the device found, whether the Triton kernels can "
        "run here, the GPU target the launchers configure for, and the backend (triton or "
        "torch) each op uses for tensors on the default device. SAEI_IMPL is honoured.",
    )
    info_parser.set_defaults(run=info)
    from saei_fast.tools.demo.command import add_demo_parser

    add_demo_parser(commands)
    from saei_fast.tools.benchmarks.command import add_bench_parser

    add_bench_parser(commands)
    from saei_fast.tools.kernel_report.command import add_kernels_parser

    add_kernels_parser(commands)
    parser.subcommands = dict(commands.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse reports leftovers under the top-level name; they belong to the subcommand.
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
