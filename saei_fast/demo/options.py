"""The demo's settings, importable without the demo's dependencies (the command-line parser
reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass

ARMS = ("vanilla", "saei")

# Distributions `saei-fast demo` imports, by import name (the `demo` extra installs them).
DEPENDENCIES = ("trl", "transformers", "datasets", "matplotlib", "PIL")


@dataclass
class DemoOptions:
    """What ``saei-fast demo`` runs (the command-line flags)."""

    steps: int = 120
    output_dir: str = "saei-demo"
    seed: int = 0
    model: str | None = None
    dataset: str | None = None
    alpha: float = 2 / 255
    eval_every: int = 10
    eval_size: int = 128
    arms: tuple[str, ...] = ARMS
