"""``summary.json`` and ``summary.txt``: what was measured, per arm and seed, and the paired
differences between arms; nothing else.

Per arm, lists have one value per seed (in ``seeds`` order):

- ``entropy_clean_first`` / ``_last``, ``accuracy_*``, ``pass_at_k_*``, ``distinct_*``: the
  held-out evaluation (see :mod:`saei_fast.tools.demo.evaluate`) before the first GRPO step (the
  warm start; identical across arms) and after the last;
- ``train_entropy_clean_last``, ``train_reward_last``: the training logs' clean-row policy
  entropy and reward, averaged over the last ``window`` steps;
- ``frac_reward_zero_std_mean``: TRL's fraction of groups whose rewards are all equal (no
  learning signal), averaged over the run.

``attack`` (the SaEI arm) and ``control_perturbation`` (the random control) summarise the
per-step logs: the median over steps of ``saei/entropy_gain_relative`` (per step, the median
over groups of after / before - 1 of the band objective), the mean fraction of groups whose
objective fell, and the mean distinct completions per group among the clean and among the
perturbed-image rows.
"""

from __future__ import annotations

import statistics

from saei_fast.tools.demo.plots import clean_row_entropy
from saei_fast.tools.demo.stats import paired_difference

# Per-seed values compared between arms, and the text labels of the summary table.
PAIRED = {
    "entropy_clean_last": "held-out entropy (nats/token)",
    "accuracy_last": "held-out sampled accuracy",
    "pass_at_k_last": "held-out pass@k",
    "train_entropy_clean_last": "training clean-row entropy",
}
PAIRS = {"saei-vanilla": ("saei", "vanilla"), "saei-control": ("saei", "control")}
GAIN_TARGET = 0.05


def build_summary(records: list[dict], setup, *, seconds: float) -> dict:
    """The summary of every run (``records``: one per arm and seed, from ``train_arm``)."""
    recipe, options = setup.recipe, setup.options
    seeds = list(recipe.seeds)
    window = max(1, min(recipe.eval_every, recipe.steps))
    arms = {}
    for arm in options.arms:
        runs = [_find(records, seed, arm) for seed in seeds]
        arms[arm] = {
            **{
                f"{name}_{when}": [run["evals"][index][key] for run in runs]
                for key, name in (
                    ("entropy", "entropy_clean"),
                    ("accuracy", "accuracy"),
                    ("pass_at_k", "pass_at_k"),
                    ("distinct", "distinct"),
                )
                for when, index in (("first", 0), ("last", -1))
            },
            "train_entropy_clean_last": [
                _mean([clean_row_entropy(arm, s) for s in run["steps"][-window:]]) for run in runs
            ],
            "train_reward_last": [
                _mean([s.get("reward") for s in run["steps"][-window:]]) for run in runs
            ],
            "frac_reward_zero_std_mean": [
                _mean([s.get("frac_reward_zero_std") for s in run["steps"]]) for run in runs
            ],
            "seconds": [run["seconds"] for run in runs],
        }
    paired = {
        name: {
            metric: paired_difference(arms[first][metric], arms[second][metric])
            for metric in PAIRED
            if None not in arms[first][metric] + arms[second][metric]
        }
        for name, (first, second) in PAIRS.items()
        if first in arms and second in arms
    }
    summary = {
        "task": setup.description,
        "model": options.model or "tiny Qwen2.5-VL built from a config",
        "settings": {
            "steps": recipe.steps,
            "warmup_steps": recipe.warmup_steps,
            "prompts_per_step": recipe.prompts_per_step,
            "num_generations": recipe.num_generations,
            "n_clean": recipe.num_generations // 2,
            "n_adv": recipe.num_generations - recipe.num_generations // 2,
            "alpha": options.alpha,
            "learning_rate": recipe.learning_rate,
            "temperature": recipe.temperature,
            "samples_per_image": recipe.samples,
            "heldout_images": len(setup.heldout),
            "window": window,
        },
        "seeds": seeds,
        "blind_accuracy": setup.blind_accuracy,
        "arms": arms,
        "paired": paired,
        "total_seconds": seconds,
    }
    for key, arm in (("attack", "saei"), ("control_perturbation", "control")):
        if arm in arms:
            summary[key] = _perturbation(records, arm)
    summary["notes"] = _notes(summary)
    return summary


def _perturbation(records: list[dict], arm: str) -> dict:
    steps = [step for record in records if record["arm"] == arm for step in record["steps"]]
    gains = [s["saei/entropy_gain_relative"] for s in steps if "saei/entropy_gain_relative" in s]
    return {
        "relative_gain_median": statistics.median(gains) if gains else None,
        "negative_gain_fraction": _mean([s.get("saei/gain_negative_fraction") for s in steps]),
        "distinct_answers_clean": _mean([s.get("saei/distinct_clean") for s in steps]),
        "distinct_answers_adv": _mean([s.get("saei/distinct_adv") for s in steps]),
        "entropy_before_mean": _mean([s.get("saei/entropy_before") for s in steps]),
        "entropy_after_mean": _mean([s.get("saei/entropy_after") for s in steps]),
        "steps_measured": len(gains),
    }


def _notes(summary: dict) -> list[str]:
    notes = []
    gain = summary.get("attack", {}).get("relative_gain_median")
    if "attack" in summary and (gain is None or gain < GAIN_TARGET):
        measured = "was not measured" if gain is None else f"was {gain:+.1%}"
        notes.append(
            f"the attack's median relative gain of the band objective {measured}, below the "
            f"{GAIN_TARGET:.0%} this demo is tuned for"
        )
    if len(summary["seeds"]) < 2 and summary["paired"]:
        notes.append("one seed: the paired differences have no confidence interval")
    return notes


def summary_text(summary: dict) -> str:
    """The human-readable summary (also ``summary.txt``)."""
    settings = summary["settings"]
    k = settings["samples_per_image"]
    seeds = summary["seeds"]
    lines = [
        f"saei-fast demo summary: {summary['task']}; {summary['model']}",
        f"{settings['steps']} GRPO steps per arm from a {settings['warmup_steps']}-step "
        f"supervised warm start; {settings['prompts_per_step']} prompts x G="
        f"{settings['num_generations']} per step (SaEI and control: {settings['n_clean']} clean + "
        f"{settings['n_adv']} perturbed, alpha={settings['alpha'] * 255:g}/255); seeds {seeds}",
        f"held-out: {settings['heldout_images']} images x {k} answers sampled at temperature "
        f"{settings['temperature']:g}; best image-blind accuracy {summary['blind_accuracy']:.3f}",
        "",
        "per arm, mean over seeds (per-seed values):",
    ]
    rows = (
        ("entropy_clean_first", "held-out entropy, warm start"),
        ("entropy_clean_last", "held-out entropy, last"),
        ("accuracy_first", "held-out sampled accuracy, warm start"),
        ("accuracy_last", "held-out sampled accuracy, last"),
        ("pass_at_k_last", f"held-out pass@{k}, last"),
        ("train_entropy_clean_last", "training clean-row entropy, last"),
        ("frac_reward_zero_std_mean", "frac_reward_zero_std, run mean"),
    )
    for arm, values in summary["arms"].items():
        lines.append(f"  {arm}:")
        for key, label in rows:
            per_seed = values[key]
            shown = ", ".join("-" if v is None else f"{v:.3f}" for v in per_seed)
            lines.append(f"    {label:<40} {_fmt(_mean(per_seed))} ({shown})")
    for name, metrics in summary["paired"].items():
        lines += ["", f"paired difference {name} (mean over seeds, 95% t-interval):"]
        for metric, result in metrics.items():
            interval = result["ci95"]
            shown = (
                "no interval" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"
            )
            label = PAIRED[metric].replace("pass@k", f"pass@{k}")
            lines.append(f"  {label:<34} {result['mean']:+.3f}  {shown}")
    for key, label in (("attack", "SaEI attack"), ("control_perturbation", "random control")):
        if key in summary:
            p = summary[key]
            lines += [
                "",
                f"{label}: band objective after / before - 1, median over steps of the "
                f"per-group median: {_fmt(p['relative_gain_median'], '+.1%')}; groups whose "
                f"objective fell: {_fmt(p['negative_gain_fraction'], '.1%')}; distinct answers "
                f"per group, clean rows {_fmt(p['distinct_answers_clean'], '.2f')}, perturbed "
                f"rows {_fmt(p['distinct_answers_adv'], '.2f')}",
            ]
    for note in summary["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"total time {summary['total_seconds']:.0f} s")
    return "\n".join(lines)


def _find(records: list[dict], seed: int, arm: str) -> dict:
    return next(r for r in records if r["seed"] == seed and r["arm"] == arm)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
