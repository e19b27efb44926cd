"""The ``saei-fast demo`` subcommand: its flags and its handler.

Every user error (a bad flag value, a missing model folder or data file, a bad JSONL line or
image, an output folder that is a file, a missing dependency) is reported before any work as
one line ``saei-fast demo: error: ...`` on stderr, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from saei_fast.tools.demo.options import ARMS, DEPENDENCIES, DemoError, DemoOptions

PROG = "saei-fast demo"


def _default(name: str) -> str:
    """The help text's default of recipe field ``name``: the tiny model's recipe (the
    no-argument demo), and what --quick makes of it."""
    # Imported here: setup imports torch, which the other subcommands' --help need not load.
    from saei_fast.tools.demo.setup import TINY_QUICK, TINY_RECIPE

    value = getattr(TINY_RECIPE, name)
    text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    if name in TINY_QUICK:
        shrunk = TINY_QUICK[name]
        text += "; --quick: " + (
            ",".join(map(str, shrunk)) if isinstance(shrunk, tuple) else str(shrunk)
        )
    return f"(default {text})"


def add_demo_parser(commands) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``saei-fast`` subcommands."""
    defaults = DemoOptions()
    parser = commands.add_parser(
        "demo",
        help="vanilla GRPO, SaEI and a random-perturbation control on a tiny Qwen2.5-VL and a "
        "synthetic visual task, over several seeds (CPU, under 5 minutes; --quick: ~1 minute)",
        description="Trains a tiny Qwen2.5-VL (no download) from a supervised warm start with "
        "three GRPO arms (vanilla, SaEI, random-perturbation control) over several seeds, and "
        "writes summary.json / summary.txt (paired differences with 95% intervals), "
        "metrics.json / metrics.csv and one plot per metric (plots/*.png) to --output-dir. "
        "With --model and --dataset the same three arms run on a local Hugging Face VLM and a "
        "local JSONL (a recipe for a pretrained model: no warm start, a smaller step size).",
    )
    parser.error = _one_line_error  # argparse's own errors print usage lines first
    add = parser.add_argument
    add(
        "--output-dir",
        default=defaults.output_dir,
        help=f"where results go (default {defaults.output_dir}; created if missing)",
    )
    add("--quick", action="store_true", help="fewer seeds, steps and held-out images")
    add("--seeds", default=None, help=f"comma-separated seeds {_default('seeds')}")
    add("--steps", type=int, default=None, help=f"GRPO steps per arm and seed {_default('steps')}")
    add(
        "--arms",
        default=",".join(ARMS),
        help=f"comma-separated subset of {','.join(ARMS)} (default all three)",
    )
    add(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help=f"perturbation size in [0, 1] pixel units (default 2/255 = {defaults.alpha:.5f})",
    )
    add(
        "--eval-every",
        type=int,
        default=None,
        help=f"GRPO steps between held-out evaluations {_default('eval_every')}",
    )
    add("--eval-size", type=int, default=None, help=f"held-out images {_default('eval_size')}")
    add(
        "--samples",
        type=int,
        default=None,
        help=f"answers sampled per held-out image, the k of pass@k {_default('samples')}",
    )
    add(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"supervised warm-start steps, 0 for none {_default('warmup_steps')}",
    )
    add("--workers", type=int, default=None, help="parallel runs (default: CPU cores, at most 2)")
    add("--cache-dir", default=None, help="warm-start cache (default ~/.cache/saei-fast/demo)")
    add(
        "--num-processes",
        type=int,
        default=defaults.num_processes,
        help="CPU processes per run (DDP over gloo, torch.distributed.run); each samples its "
        "share of a step's prompts",
    )
    add("--model", default=None, help="local Hugging Face VLM folder instead of the tiny model")
    add(
        "--dataset",
        default=None,
        help="local JSONL of {image, question, answer} (image paths relative to the file; "
        "answer: a string or a list of right answers)",
    )
    parser.set_defaults(run=demo)
    return parser


def demo(args: argparse.Namespace) -> int:
    """Run the demo; user errors exit with status 2 before any work."""
    import importlib.util

    missing = [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        return _fail(f"needs {', '.join(missing)}: pip install 'saei-fast[demo]'")
    try:
        options = DemoOptions(
            output_dir=args.output_dir,
            seeds=_seeds(args.seeds),
            steps=args.steps,
            model=args.model,
            dataset=args.dataset,
            alpha=args.alpha,
            eval_every=args.eval_every,
            eval_size=args.eval_size,
            samples=args.samples,
            warmup_steps=args.warmup_steps,
            arms=tuple(arm.strip() for arm in args.arms.split(",")),
            quick=args.quick,
            workers=args.workers,
            cache_dir=args.cache_dir,
            num_processes=args.num_processes,
        )
        from saei_fast.tools.demo.run import run_demo

        run_demo(options)  # raises DemoError only before any work
    except DemoError as error:
        return _fail(str(error))
    return 0


def _seeds(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise DemoError(f"--seeds must be comma-separated integers, got {text!r}") from None


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _one_line_error(message: str):
    sys.exit(_fail(message))
