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
OPTIONAL_PACKAGES = ("triton", "numpy", "transformers", "trl", "liger-kernel", "cut-cross-entropy")


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


def info(_args: argparse.Namespace) -> int:
    """Print versions, devices and the backend each op uses on this machine."""
    import torch

    import saei_fast
    from saei_fast.ops.dispatch import resolve_impl

    print(f"saei-fast {saei_fast.__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__}")
    for name in OPTIONAL_PACKAGES:
        print(f"{name:<9} {_version(name)}")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"device    CUDA: {torch.cuda.get_device_name(device)}")
    else:
        device = torch.device("cpu")
        print(f"device    CPU only ({platform.machine()}, CUDA unavailable)")
    print(f"kernels   {_triton_status()}")
    print("\nbackend per op for tensors on this machine's default device:")
    try:
        backend = resolve_impl(None, device)
    except ValueError as error:  # an invalid SAEI_IMPL is worth reporting, not crashing on
        backend = f"error: {error}"
    for op in DISPATCHED_OPS:
        if hasattr(saei_fast, op):
            print(f"  {op:<30} {backend}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saei-fast",
        description="Fused kernels and drop-in ops for SaEI (selective-adversarial entropy "
        "intervention) in GRPO trainers for vision-language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser(
        "info", help="versions, devices, and the backend each op uses on this machine"
    )
    info_parser.set_defaults(run=info)
    add_demo_parser(commands)
    from saei_fast.benchmarks.command import add_bench_parser

    add_bench_parser(commands)
    return parser


def demo(args: argparse.Namespace) -> int:
    """Train vanilla GRPO and SaEI side by side and write metrics, plot and summary."""
    import importlib.util

    from saei_fast.demo.options import DEPENDENCIES, DemoOptions

    missing = [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"saei-fast demo needs {', '.join(missing)}: pip install 'saei-fast[demo]'",
            file=sys.stderr,
        )
        return 2
    from saei_fast.demo.run import run_demo

    run_demo(
        DemoOptions(
            steps=args.steps,
            output_dir=args.output_dir,
            seed=args.seed,
            model=args.model,
            dataset=args.dataset,
            alpha=args.alpha,
            eval_every=args.eval_every,
            arms=tuple(args.arms.split(",")),
        )
    )
    return 0


def add_demo_parser(commands) -> None:
    from saei_fast.demo.options import ARMS, DemoOptions

    defaults = DemoOptions()
    parser = commands.add_parser(
        "demo",
        help="train a tiny Qwen2.5-VL with vanilla GRPO and with SaEI on a synthetic visual "
        "task (CPU, minutes) and compare policy entropy and reward",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="GRPO steps per arm")
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where results go")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of model and data")
    parser.add_argument(
        "--model", default=None, help="local Hugging Face VLM folder instead of the tiny model"
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="local JSONL of {image, question, answer} (image paths relative to the file)",
    )
    parser.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="SaEI step in [0, 1] pixel units"
    )
    parser.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, help="held-out check interval"
    )
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}"
    )
    parser.set_defaults(run=demo)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
