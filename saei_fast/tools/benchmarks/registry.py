"""The benchmark registry: every op's ``OpBench`` by name (``OPS``, from the ops' ``*_cases.py``
modules) and ``cases_for(...)``, the cases ``pytest bench/`` and ``saei-fast bench`` both
enumerate, with shapes given on the command line parsed against each op's dimensions.
"""

from __future__ import annotations

import re

import torch

from saei_fast.tools.benchmarks.attack_cases import ATTACK
from saei_fast.tools.benchmarks.band_cases import BAND_MASK
from saei_fast.tools.benchmarks.cases import Case, OpBench
from saei_fast.tools.benchmarks.entropy_cases import ENTROPY
from saei_fast.tools.benchmarks.linear_cases import LINEAR_ENTROPY
from saei_fast.tools.benchmarks.linear_loss_cases import LINEAR_LOSS
from saei_fast.tools.benchmarks.loss_head_cases import LOSS_HEAD

# The order of the tables of ``saei-fast bench`` and of ``cases_for(None, ...)``.
OPS: dict[str, OpBench] = {
    op.name: op for op in (ENTROPY, LINEAR_ENTROPY, LINEAR_LOSS, BAND_MASK, ATTACK, LOSS_HEAD)
}


def parse_shape(op: OpBench, text: str) -> tuple[int, ...]:
    """``"512x32000"`` -> ``(512, 32000)``, checked against the op's dimensions."""
    try:
        dims = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != len(op.dims) or min(dims, default=0) < 1:
        raise ValueError(
            f"shape for {op.name} must be {'x'.join(op.dims)} with positive integers, got {text!r}"
        )
    return dims


def _shapes_by_op(names: list[str], shapes: list[str], explicit_ops: bool) -> dict:
    """``"entropy:512x32000"`` applies to that op; a bare ``"512x32000"`` to the selected ops
    with that many dimensions, which must then be named (two-dimensional shapes fit entropy,
    band and attack alike, and an attack with 512 rows is not a typo to run silently)."""
    by_op: dict[str, list[tuple[int, ...]]] = {}
    for text in shapes:
        op_name, _, dims = text.rpartition(":")
        if not re.fullmatch(r"\d+(x\d+)*", dims.lower()):
            raise ValueError(
                f"shape {text!r} is malformed: write it as sizes joined by 'x', e.g. 512x32000 "
                "or entropy:512x32000"
            )
        if op_name:
            if op_name not in names:
                raise ValueError(f"shape {text!r} names op {op_name!r}, not among {names}")
            by_op.setdefault(op_name, []).append(parse_shape(OPS[op_name], dims))
            continue
        fitting = [n for n in names if len(OPS[n].dims) == dims.count("x") + 1]
        if len(fitting) > 1 and not explicit_ops:
            raise ValueError(
                f"shape {text!r} fits several ops ({', '.join(fitting)}): pass --ops or write "
                f"it as <op>:{text}"
            )
        for name in fitting:
            by_op.setdefault(name, []).append(parse_shape(OPS[name], dims))
    return by_op


def cases_for(
    ops: list[str] | tuple[str, ...] | None,
    device: torch.device,
    *,
    quick: bool = False,
    shapes: list[str] | None = None,
    providers: list[str] | None = None,
) -> list[Case]:
    """The cases of ``ops`` (all when None) on ``device``, ordered op, shape, mode, provider.
    ``shapes`` replaces the ops' shapes (``"512x32000"`` or ``"entropy:512x32000"``; an op
    that no shape fits is left out); ``providers`` keeps only the named providers."""
    names = list(OPS) if ops is None else list(ops)
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise ValueError(f"ops must be among {sorted(OPS)}, got {unknown}")
    if providers is not None:
        known = {p for name in names for p in OPS[name].providers}
        bad = [p for p in providers if p not in known]
        if bad:
            raise ValueError(f"providers must be among {sorted(known)}, got {bad}")
    if shapes is not None and not shapes:
        raise ValueError("shapes is empty: give at least one shape, e.g. 512x32000")
    custom = _shapes_by_op(names, shapes, ops is not None) if shapes is not None else None
    result = []
    for name in names:
        op = OPS[name]
        op_shapes = op.shapes(device, quick) if custom is None else custom.get(name, [])
        for dims in op_shapes:
            for mode in op.modes:
                for provider in op.providers.values():
                    if providers is not None and provider.name not in providers:
                        continue
                    if provider.modes is not None and mode not in provider.modes:
                        continue
                    result.append(Case(op, provider, dims, mode))
    return result
