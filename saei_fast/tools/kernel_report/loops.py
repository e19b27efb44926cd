"""Loops of a disassembled kernel, as index ranges, and the choice of the hot one."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Loop:
    """Instructions ``start..end`` (inclusive indices) of one loop body."""

    start: int
    end: int

    def contains(self, other: Loop) -> bool:
        return self != other and self.start <= other.start and other.end <= self.end


def innermost(loops: list[Loop]) -> list[Loop]:
    """The loops that contain no other loop."""
    return [loop for loop in loops if not any(loop.contains(other) for other in loops)]


def pick_hot(candidates: list[tuple[Loop, list[int], list[int]]]) -> Loop | None:
    """The steady-state loop among ``(loop, load widths, store widths)``: the one moving the
    most global memory per pass, loads first. A compiler that unrolls a streaming loop keeps
    a smaller remainder loop beside it; the unrolled body is the one that runs."""
    if not candidates:
        return None
    best = max(candidates, key=lambda c: (sum(c[1]), sum(c[2]), c[0].end - c[0].start))
    return best[0]
