"""The demo's settings and user-error type, importable without the demo's dependencies (the
command-line parser reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

# vanilla: GRPO with G responses from the clean image; saei: n_clean clean + n_adv from the
# entropy attack's image; control: the same split, the adversarial image replaced by a
# random-sign step of the same L-inf size (NoisyRollout-style).
ARMS = ("vanilla", "saei", "control")

# Distributions `saei-fast demo` imports, by import name (the `demo` extra installs them).
DEPENDENCIES = ("trl", "transformers", "datasets", "matplotlib", "PIL")


class DemoError(ValueError):
    """A user error of ``saei-fast demo`` (a bad flag, a missing model folder or data file),
    found before any work; the command prints it as one line and exits with status 2."""


@dataclass
class DemoOptions:
    """What ``saei-fast demo`` runs (the command-line flags). ``None`` takes the setup's
    default (:mod:`saei_fast.tools.demo.setup`), which ``quick`` shrinks."""

    output_dir: str = "saei-demo"
    seeds: tuple[int, ...] | None = None
    steps: int | None = None
    model: str | None = None
    dataset: str | None = None
    alpha: float = 2 / 255
    eval_every: int | None = None
    eval_size: int | None = None
    samples: int | None = None
    warmup_steps: int | None = None
    arms: tuple[str, ...] = ARMS
    quick: bool = False
    workers: int | None = None
    cache_dir: str | None = None
    num_processes: int = 1  # CPU processes per run (torch.distributed.run, gloo)
