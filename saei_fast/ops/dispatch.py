"""The one dispatch point: which implementation an op runs, and with which options.

Every op asks here, and only here: which implementation runs (``impl=`` or ``SAEI_IMPL``,
the device, the float64 rule), whether the PyTorch path compiles its per-row math on CPU
tensors (``SAEI_CPU_COMPILE``), and which opt-in choices the Triton launchers get
(``SAEI_AUTOTUNE``, ``SAEI_LINEAR_TMA``, ``TRITON_INTERPRET``, ``SAEI_TARGET``), handed down
as one :class:`~saei_fast.kernels.plan.KernelOptions`: nothing under ``kernels/`` reads the
environment. The variables are read at every call, so a change takes effect on the next one.

GPU tensors go to Triton, CPU tensors to the chunked PyTorch path. A ROCm build of torch
(``torch.version.hip`` set) exposes AMD GPUs as ``cuda`` devices, and Triton compiles the
same kernels for them (each launcher picks its configuration per target), so AMD GPUs take
the Triton path too. ``SAEI_IMPL=triton|torch`` (or an ``impl=`` argument on the
``saei_fast.ops`` entry points) forces one; forcing Triton on CPU tensors is only possible
under ``TRITON_INTERPRET=1``, which is how the kernels are tested on machines without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from saei_fast.kernels.plan import KernelOptions

IMPLS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _flag(name: str) -> bool:
    """An on/off environment variable: unset, empty or ``0`` is off."""
    return os.environ.get(name, "0") not in ("", "0")


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _flag("TRITON_INTERPRET")


# The opt-in TMA forward of the linear kernels (sm_90 only, unmeasured): off unless set.
LINEAR_TMA_ENV = "SAEI_LINEAR_TMA"


CPU_COMPILE_MODES = ("auto", "0", "1")


def cpu_compile_mode() -> str:
    """``SAEI_CPU_COMPILE`` for the PyTorch path on CPU tensors: ``"1"`` (the per-row math
    always compiled by Inductor), ``"0"`` (eager) or ``"auto"`` (compiled where it works)."""
    mode = os.environ.get("SAEI_CPU_COMPILE", "auto").strip().lower() or "auto"
    if mode not in CPU_COMPILE_MODES:
        raise ValueError(f"SAEI_CPU_COMPILE must be one of {CPU_COMPILE_MODES}, got {mode!r}")
    return mode


def kernel_options() -> KernelOptions:
    """The options every Triton launch gets now: the opt-in configuration search
    (``SAEI_AUTOTUNE=1``), the opt-in
    TMA linear forward (``SAEI_LINEAR_TMA=1``), whether the kernels run in the interpreter,
    and the target CPU tensors choose their configuration for (``SAEI_TARGET``, sm_90)."""
    return KernelOptions(
        autotune=_flag("SAEI_AUTOTUNE"),
        linear_tma=_flag(LINEAR_TMA_ENV),
        interpreting=triton_interpreting(),
        cpu_target=os.environ.get("SAEI_TARGET", "sm_90"),
    )


def is_gpu(device: torch.device) -> bool:
    """True for an NVIDIA GPU on a CUDA build of torch and an AMD GPU on a ROCm build: both
    are ``cuda`` devices to torch, and Triton has a backend for both."""
    return device.type == "cuda"


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``impl`` (or, when it is None, the ``SAEI_IMPL`` environment variable) is one of
    ``"auto"``, ``"triton"``, ``"torch"``.
    """
    requested = impl if impl is not None else os.environ.get("SAEI_IMPL", "auto")
    if requested not in IMPLS:
        source = "impl" if impl is not None else "SAEI_IMPL"
        raise ValueError(f"{source} must be one of {IMPLS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if is_gpu(device) and triton_available() else "torch"
    if not triton_available():
        raise ValueError("impl='triton' was requested but Triton is not installed")
    if not is_gpu(device) and not triton_interpreting():
        raise ValueError(
            f"impl='triton' needs GPU tensors (CUDA or ROCm), got tensors on {device}; "
            "set TRITON_INTERPRET=1 before importing saei_fast to run the kernels on the CPU"
        )
    return "triton"


def op_impl(impl: str | None, tensor: torch.Tensor) -> str:
    """:func:`resolve_impl` for an op's main input, with the float64 rule: float64 inputs
    (gradient checks) always run on the PyTorch path, because the kernels accumulate in
    float32."""
    resolved = resolve_impl(impl, tensor.device)
    return "torch" if tensor.dtype == torch.float64 else resolved
