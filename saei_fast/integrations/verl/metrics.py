"""The ``saei/`` metrics of one verl training step, from the rows' ``extra_fields``.

The agent loop marks every row with ``saei_adversarial`` and puts the attack's numbers of its
group on the group's first adversarial row (``saei_entropy_before``, ``saei_entropy_after``,
``saei_selected_tokens``, ``saei_attack_seconds``, ``saei_attack_peak_memory_bytes``); the
SaEI trainer reads them back with the rows' rewards. Names and meanings follow the TRL
trainer's:

- ``entropy_before`` / ``entropy_after``: mean over groups of the band objective on the clean
  and on the perturbed image (same band mask); ``entropy_gain`` their difference;
- ``entropy_gain_relative``: median over groups of ``after / before - 1``;
  ``gain_negative_fraction``: fraction of groups whose objective went down (groups with a
  selected token);
- ``selected_tokens``: completion tokens in the band, all groups of the step;
- ``attack_seconds``: the actor's attack time, all groups of the step;
  ``attack_peak_memory_mb``: the largest peak of one group's attack;
- ``reward_clean`` / ``reward_adv``: mean reward of the clean and of the adversarial rows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

GROUP_FIELDS = (
    "saei_entropy_before",
    "saei_entropy_after",
    "saei_selected_tokens",
    "saei_attack_seconds",
    "saei_attack_peak_memory_bytes",
)


def group_fields(result: dict) -> dict:
    """The extra fields of a group's first adversarial row, from the actor's result."""
    values = (
        result["entropy_before"],
        result["entropy_after"],
        result["num_selected"],
        result["seconds"],
        result["peak_memory_bytes"],
    )
    return dict(zip(GROUP_FIELDS, values, strict=True))


def step_metrics(extra_fields: Sequence[dict], rewards: Sequence[float]) -> dict[str, float]:
    """``saei/`` metrics of one step from every row's extra fields and reward (same order).

    Raises:
        ValueError: ``extra_fields`` and ``rewards`` of different lengths.
    """
    if len(extra_fields) != len(rewards):
        raise ValueError(
            f"extra_fields ({len(extra_fields)} rows) and rewards ({len(rewards)}) must match"
        )
    metrics: dict[str, float] = {}
    adversarial = [bool((fields or {}).get("saei_adversarial")) for fields in extra_fields]
    for name, flag in (("reward_clean", False), ("reward_adv", True)):
        values = [float(r) for r, a in zip(rewards, adversarial, strict=True) if a is flag]
        if values:
            metrics[f"saei/{name}"] = statistics.fmean(values)
    groups = [
        fields
        for fields in extra_fields
        if fields and fields.get("saei_entropy_before") is not None
    ]
    if not groups:
        return metrics
    before = [float(g["saei_entropy_before"]) for g in groups]
    after = [float(g["saei_entropy_after"]) for g in groups]
    metrics["saei/entropy_before"] = statistics.fmean(before)
    metrics["saei/entropy_after"] = statistics.fmean(after)
    metrics["saei/entropy_gain"] = metrics["saei/entropy_after"] - metrics["saei/entropy_before"]
    relative = [a / b - 1.0 for a, b in zip(after, before, strict=True) if b > 0]
    relative = [value for value in relative if math.isfinite(value)]
    if relative:
        metrics["saei/entropy_gain_relative"] = statistics.median(relative)
        metrics["saei/gain_negative_fraction"] = sum(v < 0 for v in relative) / len(relative)
    metrics["saei/selected_tokens"] = float(sum(int(g["saei_selected_tokens"]) for g in groups))
    metrics["saei/attack_seconds"] = float(sum(float(g["saei_attack_seconds"]) for g in groups))
    metrics["saei/attack_peak_memory_mb"] = (
        max(int(g["saei_attack_peak_memory_bytes"]) for g in groups) / 2**20
    )
    return metrics
