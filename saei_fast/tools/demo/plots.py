"""One PNG per metric: every arm (colour) and seed (thin line), and the mean over seeds
(thick line)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

COLOURS = {"vanilla": "tab:blue", "saei": "tab:red", "control": "tab:green"}


def clean_row_entropy(arm: str, step: dict) -> float | None:
    """Policy entropy of the loss forward over the rows sampled from the clean image: TRL's
    ``entropy`` for vanilla (every row is clean), SaEI's split for the other arms (TRL's
    value there averages in the rows sampled from the perturbed image)."""
    return step.get("entropy") if arm == "vanilla" else step.get("saei/entropy_clean_rows")


def _logged(key: str) -> Callable[[str, dict], float | None]:
    return lambda _arm, step: step.get(key)


# (file name, title, "evals" or "steps", value of one entry)
METRICS = (
    ("heldout_entropy", "held-out policy entropy (nats/token, clean image)", "evals",
     _logged("entropy")),
    ("heldout_accuracy", "held-out sampled accuracy", "evals", _logged("accuracy")),
    ("heldout_pass_at_k", "held-out pass@k", "evals", _logged("pass_at_k")),
    ("heldout_distinct", "held-out distinct answers per image", "evals", _logged("distinct")),
    ("train_reward", "training reward (all rows)", "steps", _logged("reward")),
    ("train_entropy_clean", "training policy entropy, clean-image rows (nats/token)", "steps",
     clean_row_entropy),
    ("frac_reward_zero_std", "groups with identical rewards (TRL frac_reward_zero_std)", "steps",
     _logged("frac_reward_zero_std")),
    ("attack_relative_gain", "band objective after / before - 1 (median over groups)", "steps",
     _logged("saei/entropy_gain_relative")),
)  # fmt: skip


def plot_all(records: list[dict], folder: Path, *, samples: int) -> list[Path]:
    """Write one PNG per metric of :data:`METRICS` into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, title, source, value in METRICS:
        figure, axis = plt.subplots(figsize=(6.4, 4.2))
        drawn = False
        for arm in dict.fromkeys(record["arm"] for record in records):
            curves = []
            for record in (r for r in records if r["arm"] == arm):
                points = [
                    (entry["step"], value(arm, entry))
                    for entry in record[source]
                    if value(arm, entry) is not None
                ]
                if points:
                    curves.append(points)
                    axis.plot(
                        *zip(*points, strict=True), color=COLOURS[arm], alpha=0.3, linewidth=0.8
                    )
            if curves:
                drawn = True
                steps, mean = _mean_curve(curves)
                axis.plot(steps, mean, color=COLOURS[arm], linewidth=2.2, label=f"{arm} (mean)")
        axis.set_title(title.replace("pass@k", f"pass@{samples}"), fontsize=10)
        axis.set_xlabel("GRPO step")
        if drawn:
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Mean over seeds at the steps every seed has."""
    common = set.intersection(*({step for step, _ in curve} for curve in curves))
    steps = sorted(common)
    tables = [dict(curve) for curve in curves]
    return steps, [sum(t[s] for t in tables) / len(tables) for s in steps]
