"""What a benchmark case is: a ``Provider`` (one way of computing an op), an ``OpBench`` (one
op: its providers, shapes per device, an input builder and the work formulas, bytes moved and
FLOPs, that turn a time into GB/s or TFLOP/s) and a ``Case`` (one provider, shape and mode),
with ``skip_reason`` and ``prepare`` (the zero-argument call that is timed). The ops' own
``*_cases.py`` modules build on these types; ``registry.py`` collects them.

Modes: ``forward`` (under ``torch.no_grad``), ``forward+backward`` (the op's differentiable
input is a leaf; its gradient is computed) and ``call`` (the provider runs as is: the attack
does its own backward to the pixels).

A provider that needs CUDA or a package that is not installed is still listed: it becomes a
skipped case whose reason says why (``skip_reason``), never a silent omission or a stand-in.
"""

from __future__ import annotations

import importlib.util
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
