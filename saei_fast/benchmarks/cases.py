"""The benchmark registry: one ``OpBench`` per op, each a set of providers, shapes per device,
an input builder and the work formulas (bytes moved, FLOPs) that turn a time into GB/s or
TFLOP/s. ``pytest bench/`` and ``saei-fast bench`` both enumerate ``cases_for(...)``.

Modes: ``forward`` (under ``torch.no_grad``), ``forward+backward`` (the op's differentiable
input is a leaf; its gradient is computed) and ``call`` (the provider runs as is: the attack
does its own backward to the pixels).

A provider that needs CUDA or a package that is not installed is still listed: it becomes a
skipped case whose reason says why (``skip_reason``), never a silent omission or a stand-in.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FORWARD, FORWARD_BACKWARD, CALL = "forward", "forward+backward", "call"


@dataclass(frozen=True)
class Provider:
    """One way of computing an op. ``make()`` returns ``fn(**inputs)``: the per-row outputs
    (a tensor, or a tuple such as ``(logprobs, entropy)``; loss-only peers return their
    scalar loss), which the provider checks compare row by row and ``forward+backward``
    sums into a scalar loss. ``make`` runs only for cases that are not skipped, so peers are
    imported only when present."""

    name: str
    make: Callable[[], Callable[..., object]]
    kind: str = "baseline"  # "ours" | "baseline" | "peer" | "loss-only peer"
    note: str = ""
    requires_cuda: bool = False
    module: str | None = None  # a package that must be importable
    compare_to: str = "ours"  # the provider the "x ours" ratio divides by
    modes: tuple[str, ...] | None = None  # None: every mode of the op
    recomputes_forward: bool = False  # backward repeats the forward's matmul (executed FLOPs)
    # Extra warm-up calls that compile (torch.compile), so the peak memory read on the last
    # warm-up call is the op's, not the compiler's.
    compile_calls: int = 0


@dataclass(frozen=True)
class OpBench:
    """Everything needed to time one op on one device."""

    name: str
    title: str
    dims: tuple[str, ...]  # names of the shape's dimensions, e.g. ("N", "V")
    modes: tuple[str, ...]
    providers: dict[str, Provider]
    shapes: Callable[[torch.device, bool], list[tuple[int, ...]]]  # (device, quick)
    dtype: Callable[[torch.device], torch.dtype]
    build: Callable[[tuple[int, ...], torch.device, torch.dtype], dict]
    grad_input: str | None = None  # the input that becomes a leaf in forward+backward
    bytes_moved: Callable[[tuple[int, ...], str, torch.dtype], int | None] = lambda *_: None
    flops: Callable[[tuple[int, ...], str], int | None] = lambda *_: None
    # (warmup, repeats) for (device, quick)
    repeats: Callable[[torch.device, bool], tuple[int, int]] = field(
        default=lambda device, quick: (3, 20) if device.type == "cuda" else (2, 3 if quick else 5)
    )  # the peak memory is read on the last warm-up call; a CPU's first call is often 10x
    # slower than the next (page faults, thread pools), hence two warm-up calls there
    describe: Callable[[dict], dict] = lambda inputs: {}  # extra facts about the inputs
    count_host_syncs: bool = False  # latency-bound ops: count the host syncs of a call (CUDA)


@dataclass(frozen=True)
class Case:
    op: OpBench
    provider: Provider
    dims: tuple[int, ...]
    mode: str

    @property
    def shape(self) -> str:
        return "x".join(str(d) for d in self.dims)

    @property
    def id(self) -> str:
        return f"{self.op.name}-{self.shape}-{self.mode}-{self.provider.name}"


def skip_reason(case: Case, device: torch.device) -> str | None:
    """Why ``case`` cannot run on ``device`` here (None when it can)."""
    provider = case.provider
    missing = provider.module is not None and importlib.util.find_spec(provider.module) is None
    wrong_device = provider.requires_cuda and device.type != "cuda"
    if missing and wrong_device:
        return f"{provider.module} is not installed, and it runs only on CUDA"
    if missing:
        return f"{provider.module} is not installed"
    if wrong_device:
        return f"runs only on CUDA (this device: {device.type})"
    return None


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


def scalar_loss(outputs) -> torch.Tensor:
    """The sum of a provider's outputs (a tensor or a tuple of them) in float32: the loss
    its ``forward+backward`` case differentiates."""
    parts = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return sum(t.float().sum() for t in parts if t is not None)


def prepare(case: Case, inputs: dict) -> Callable[[], object]:
    """The zero-argument call that is timed for ``case`` on already-built ``inputs``."""
    fn = case.provider.make()
    if case.mode == FORWARD:

        def forward():
            with torch.no_grad():
                return fn(**inputs)

        return forward
    if case.mode == FORWARD_BACKWARD:
        name = case.op.grad_input
        leaf = inputs[name].detach().requires_grad_(True)
        leaf_inputs = {**inputs, name: leaf}

        def forward_backward():
            leaf.grad = None
            scalar_loss(fn(**leaf_inputs)).backward()

        return forward_backward
    return lambda: fn(**inputs)


def _registry() -> dict[str, OpBench]:
    from saei_fast.benchmarks.attack_cases import ATTACK
    from saei_fast.benchmarks.band_cases import BAND_MASK
    from saei_fast.benchmarks.entropy_cases import ENTROPY
    from saei_fast.benchmarks.linear_cases import LINEAR_ENTROPY
    from saei_fast.benchmarks.linear_loss_cases import LINEAR_LOSS
    from saei_fast.benchmarks.loss_head_cases import LOSS_HEAD

    ops = (ENTROPY, LINEAR_ENTROPY, LINEAR_LOSS, BAND_MASK, ATTACK, LOSS_HEAD)
    return {op.name: op for op in ops}


OPS: dict[str, OpBench] = _registry()
