"""Paired differences between arms over seeds, with Student-t confidence intervals.

Every arm of a seed starts from the same weights and sees the same prompts and evaluation
samples, so the per-seed difference of a metric between two arms removes what the seeds
share; with n seeds its mean has the interval ``mean +- t(n - 1) * sd / sqrt(n)``, where
``t(n - 1)`` is the two-sided quantile of Student's t with n - 1 degrees of freedom (4.30
for three seeds: few seeds give wide intervals, and the interval says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def t_cdf_two_sided(t: float, dof: int) -> float:
    """P(|T| <= t) for Student's t with an integer number of degrees of freedom ``dof``
    (the closed forms of Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    theta = math.atan(abs(t) / math.sqrt(dof))
    cos2 = math.cos(theta) ** 2
    if dof % 2:  # odd: (2/pi) * (theta + sin(theta) * cos(theta) * (1 + 2/3 cos^2 + ...))
        term, series = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            series += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    term, series = 1.0, 1.0  # even: sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, dof // 2):
        term *= cos2 * (2 * k - 1) / (2 * k)
        series += term
    return math.sin(theta) * series


def t_quantile_two_sided(level: float, dof: int) -> float:
    """The t with P(|T| <= t) = ``level`` (bisection on :func:`t_cdf_two_sided` down to
    adjacent floats)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = 0.0, 1.0
    while t_cdf_two_sided(high, dof) < level:
        high *= 2
    while True:
        middle = (low + high) / 2
        if not low < middle < high:
            return middle
        if t_cdf_two_sided(middle, dof) < level:
            low = middle
        else:
            high = middle


def paired_difference(
    first: Sequence[float], second: Sequence[float], *, level: float = 0.95
) -> dict:
    """Mean of ``first[i] - second[i]`` over seeds and its ``level`` confidence interval.

    Returns ``{"mean", "ci95": [lo, hi] or None (one seed), "sd", "n", "differences"}``.
    """
    if len(first) != len(second) or not first:
        raise ValueError(
            f"paired values need the same non-zero length, got {len(first)} and {len(second)}"
        )
    differences = [a - b for a, b in zip(first, second, strict=True)]
    n = len(differences)
    mean = sum(differences) / n
    result = {"mean": mean, "ci95": None, "sd": None, "n": n, "differences": differences}
    if n > 1:
        sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
        half = t_quantile_two_sided(level, n - 1) * sd / math.sqrt(n)
        result.update(ci95=[mean - half, mean + half], sd=sd)
    return result
