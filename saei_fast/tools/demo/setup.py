"""What every run of the demo shares: the checked options, the recipe, model factory,
processor and data.

Every user error is found here, before any folder is created or any model trained:
:func:`build_setup` raises :class:`~saei_fast.tools.demo.options.DemoError` for bad flags, a model
folder that does not hold a VLM, a data set that is missing or has a bad line or image, and
an output or cache folder that is a file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from saei_fast.tools.demo.options import ARMS, DemoError, DemoOptions
from saei_fast.tools.demo.task import (
    QUESTION,
    Example,
    blind_accuracy,
    colour_examples,
    load_jsonl,
    task_words,
)


@dataclass(frozen=True)
class Recipe:
    """Training and evaluation settings of one demo setup (after ``DemoOptions`` overrides)."""

    steps: int  # GRPO steps per arm
    seeds: tuple[int, ...]
    eval_every: int  # GRPO steps between held-out evaluations
    eval_size: int  # held-out images
    samples: int  # sampled answers per held-out image (the k of pass@k)
    warmup_steps: int  # supervised steps before GRPO (0: none)
    warmup_batch: int
    warmup_lr: float
    learning_rate: float
    prompts_per_step: int
    num_generations: int  # G: vanilla samples G per prompt, SaEI G/2 clean + G/2 adversarial
    max_completion_length: int
    temperature: float = 1.0


# The tiny model: a supervised warm start to partial accuracy and moderate entropy (the
# attack's relative gain is small on an untrained, near-uniform policy), then GRPO at a
# step size that moves a 0.3M-parameter policy within a few dozen steps.
TINY_RECIPE = Recipe(
    steps=40,
    seeds=(0, 1, 2),
    eval_every=10,
    eval_size=64,
    samples=8,
    warmup_steps=150,
    warmup_batch=32,
    warmup_lr=3e-3,
    learning_rate=1e-3,
    prompts_per_step=4,
    num_generations=8,
    max_completion_length=6,
)
# --quick: the same warm start (shared cache), fewer and shorter runs.
TINY_QUICK = {"steps": 12, "seeds": (0, 1), "eval_every": 6, "eval_size": 32, "samples": 4}
# A pretrained VLM is fine-tuned as is: the usual GRPO step size, room for a short answer.
LOCAL_RECIPE = Recipe(
    steps=40,
    seeds=(0, 1, 2),
    eval_every=10,
    eval_size=64,
    samples=8,
    warmup_steps=0,
    warmup_batch=8,
    warmup_lr=1e-5,
    learning_rate=1e-6,
    prompts_per_step=2,
    num_generations=8,
    max_completion_length=32,
)
LOCAL_QUICK = {"steps": 4, "seeds": (0, 1), "eval_every": 2, "eval_size": 8, "samples": 4}


@dataclass
class Setup:
    """Everything the runs share (inherited by forked workers, never pickled)."""

    options: DemoOptions
    recipe: Recipe
    processor: object
    train: list[Example]
    heldout: list[Example]
    blind_accuracy: float
    description: str
    workers: int
    cache_dir: Path

    def make_model(self, seed: int) -> torch.nn.Module:
        """A fresh model: the tiny one from ``seed``, or the local folder's weights."""
        from saei_fast.tools.demo.model import demo_model, load_local_model

        if self.options.model is None:
            return demo_model(self.processor, seed=seed)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return load_local_model(self.options.model, dtype=dtype)


def build_setup(options: DemoOptions) -> Setup:
    """The checked settings, processor and data of ``options``.

    Raises:
        DemoError: any user error (see the module docstring), before any work.
    """
    _check_flags(options)
    _check_folder("--output-dir", options.output_dir)
    cache_dir = _check_folder("--cache-dir", options.cache_dir or default_cache_dir())
    if options.model is not None:
        model_dir = Path(options.model)
        if not (model_dir / "config.json").is_file():
            raise DemoError(f"--model {options.model} is not a folder with a config.json")
    recipe = _recipe(options)

    if options.dataset is not None:
        try:
            examples = load_jsonl(options.dataset)
        except ValueError as error:
            raise DemoError(str(error)) from None
        if len(examples) < 2:
            raise DemoError(f"--dataset {options.dataset} needs at least 2 examples")
        held = max(1, min(recipe.eval_size, len(examples) // 5))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
        heldout = [examples[i] for i in order[:held]]
        train = [examples[i] for i in order[held:]]
        description = f"{Path(options.dataset).name} ({len(train)} train / {held} held-out)"
    else:
        # One data set for every seed: seeds differ in weights, warm start and sampling.
        train = colour_examples(2048, seed=1)
        heldout = colour_examples(recipe.eval_size, seed=2)
        description = f'synthetic "{QUESTION}" ({len(heldout)} held-out images)'

    if options.model is not None:
        processor = _local_processor(options.model)
    else:
        from saei_fast.tools.demo.model import demo_processor

        processor = demo_processor(
            task_words() if options.dataset is None else _words(train + heldout)
        )
    return Setup(
        options=options,
        recipe=recipe,
        processor=processor,
        train=train,
        heldout=heldout,
        blind_accuracy=blind_accuracy(heldout),
        description=description,
        workers=_workers(options),
        cache_dir=cache_dir,
    )


def default_cache_dir() -> Path:
    """Where warm starts are kept: ``$XDG_CACHE_HOME/saei-fast/demo`` (``~/.cache`` unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "saei-fast" / "demo"


# -------------------------------------------------------------------------------------------
# Checks
# -------------------------------------------------------------------------------------------


def _check_flags(options: DemoOptions) -> None:
    for name, least in (
        ("steps", 1),
        ("eval_every", 1),
        ("eval_size", 1),
        ("samples", 1),
        ("warmup_steps", 0),
        ("workers", 1),
    ):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise DemoError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
        if value is not None and value < least:
            raise DemoError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    seeds = options.seeds
    if seeds is not None and (
        not isinstance(seeds, tuple)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise DemoError(f"--seeds must be distinct integers >= 0, got {seeds!r}")
    arms = options.arms
    if not isinstance(arms, tuple) or not arms or len(set(arms)) != len(arms):
        raise DemoError(f"--arms must name distinct arms out of {','.join(ARMS)}, got {arms!r}")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise DemoError(f"--arms: unknown arm {unknown[0]!r}; choose from {','.join(ARMS)}")
    alpha = options.alpha
    if not (isinstance(alpha, float) and math.isfinite(alpha) and 0 < alpha <= 1):
        raise DemoError(f"--alpha must be a number in (0, 1] (pixel units), got {alpha!r}")
    for name in ("output_dir", "cache_dir", "model", "dataset"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DemoError(f"--{name.replace('_', '-')} must be a non-empty path, got {value!r}")


def _check_folder(flag: str, path: str | Path) -> Path:
    """``path`` as a folder that exists or can be created: neither it nor an ancestor is a
    file."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == path else f"is inside the file {folder}"
                raise DemoError(f"{flag} {path} {what}, not a folder")
            break
    return path


def _recipe(options: DemoOptions) -> Recipe:
    local = options.model is not None
    recipe = LOCAL_RECIPE if local else TINY_RECIPE
    if options.quick:
        recipe = replace(recipe, **(LOCAL_QUICK if local else TINY_QUICK))
    overrides = {
        name: getattr(options, name)
        for name in ("steps", "seeds", "eval_every", "eval_size", "samples", "warmup_steps")
        if getattr(options, name) is not None
    }
    return replace(recipe, **overrides)


def _workers(options: DemoOptions) -> int:
    """Runs in parallel: one per core (at most 2, the demo's target machine) for the tiny
    model on the CPU; one for a local model (it needs the whole device)."""
    if options.workers is not None:
        return options.workers
    if options.model is not None or torch.cuda.is_available():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(2, cores or 1))


def _local_processor(path: str):
    from saei_fast.tools.demo.model import load_local_processor

    try:
        return load_local_processor(path)
    except (OSError, ValueError) as error:
        raise DemoError(f"--model {path}: {error}") from None


def _words(examples: list[Example]) -> list[str]:
    from saei_fast.tools.demo.model import word_tokenizer

    text = " ".join(f"{e.question} {' '.join(e.answers)}" for e in examples)
    splitter = word_tokenizer([]).backend_tokenizer.pre_tokenizer
    return [word for word, _ in splitter.pre_tokenize_str(text)]
