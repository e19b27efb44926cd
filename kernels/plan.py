"""What a launcher will launch, described without launching it, and the options it is given.

Every op's kernels choose their block sizes, warps, stages and splits in one place (a
``*_config`` function that takes a :class:`Target`), use that choice when they launch, and
expose the same choice as :class:`LaunchPlan` records through ``benchmark_plans(target)``.
``saei-fast kernels`` compiles those plans for a GPU target on a machine without a GPU and
reads registers, spills, load widths and instruction counts from the binary, so the report
describes exactly what a real launch of the benchmark shapes would run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU the launchers choose configurations for.

    ``backend`` is Triton's (``"cuda"`` or ``"hip"``), ``arch`` its architecture (``90`` for
    sm_90, ``"gfx942"`` for MI300X), ``warp_size`` 32 on NVIDIA and 64 on AMD Instinct,
    ``sm_count`` the streaming multiprocessors (NVIDIA) or compute units (AMD) that grid
    waves are counted over, and ``hbm_bytes_per_s`` / ``dense_flops`` the peak figures the
    roofline estimates use (bf16 dense tensor-core FLOP/s).
    """

    name: str
    backend: str
    arch: int | str
    warp_size: int
    sm_count: int
    hbm_bytes_per_s: float
    dense_flops: float

    @property
    def is_amd(self) -> bool:
        return self.backend == "hip"


TARGETS: dict[str, Target] = {
    # H100 SXM: 132 SMs, 3.35 TB/s, ~989 TFLOP/s dense bf16.
    "sm_90": Target("sm_90", "cuda", 90, 32, 132, 3.35e12, 989e12),
    # A100 SXM: 108 SMs, 2.04 TB/s (80 GB), 312 TFLOP/s dense bf16.
    "sm_80": Target("sm_80", "cuda", 80, 32, 108, 2.04e12, 312e12),
    # MI300X: 304 CUs, 5.3 TB/s, ~1307 TFLOP/s dense bf16.
    "gfx942": Target("gfx942", "hip", "gfx942", 64, 304, 5.3e12, 1307e12),
    # MI250X, one die (what one torch device is): 110 CUs, 1.6 TB/s, ~191 TFLOP/s bf16.
    "gfx90a": Target("gfx90a", "hip", "gfx90a", 64, 110, 1.6e12, 191e12),
}


def target_for(device: torch.device, cpu_target: str = "sm_90") -> Target:
    """The :class:`Target` for a tensor's device: the real GPU's SM count on CUDA/ROCm, and
    ``cpu_target`` (sm_90 unless the dispatch says otherwise) for CPU tensors (the Triton
    interpreter), so tests exercise the Hopper choice."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return TARGETS[cpu_target]
    props = torch.cuda.get_device_properties(device)
    if getattr(torch.version, "hip", None):
        arch = props.gcnArchName.split(":")[0]
        base = TARGETS.get(arch, TARGETS["gfx942"])
        return dataclasses.replace(base, arch=arch, sm_count=props.multi_processor_count)
    major, minor = torch.cuda.get_device_capability(device)
    base = TARGETS["sm_90"] if major >= 9 else TARGETS["sm_80"]
    return dataclasses.replace(
        base,
        name=f"sm_{major}{minor}",
        arch=major * 10 + minor,
        sm_count=props.multi_processor_count,
    )


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """The launch choices that are not read from the tensors, decided by the host's one
    dispatch point (``saei_fast.ops.dispatch.kernel_options``) and handed to every launcher:
    nothing under ``kernels/`` reads the environment.

    ``autotune``: search a small set of configurations instead of the one shipped
    (``SAEI_AUTOTUNE``; a launcher whose search needs the GPU's benchmarker skips it under
    the interpreter).
    ``linear_tma``: the opt-in TMA forward of the linear kernels (``SAEI_LINEAR_TMA``).
    ``interpreting``: the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET``).
    ``cpu_target``: the :class:`Target` whose choices CPU tensors get under the interpreter.
    The defaults are what a launch gets with none of those variables set.
    """

    autotune: bool = False
    linear_tma: bool = False
    interpreting: bool = False
    cpu_target: str = "sm_90"

    def target(self, device: torch.device) -> Target:
        """The :class:`Target` a launch on ``device`` chooses its configuration for."""
        return target_for(device, self.cpu_target)


DEFAULT_OPTIONS = KernelOptions()


def even_chunk_rows(n_rows: int, max_rows: int) -> int:
    """Rows per chunk when ``n_rows`` rows are cut into the fewest chunks of at most
    ``max_rows``, as even as possible (4096 rows under a 3456-row budget: two chunks of 2048,
    not 3456 + 640, whose small last launch would leave the GPU part idle). Plain integer
    arithmetic, here rather than beside the kernels' configuration, because the PyTorch path
    of the loss head cuts its chunks the same way and must not import Triton."""
    n_chunks = -(-n_rows // max(1, max_rows))
    return -(-n_rows // max(1, n_chunks))


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch as its launcher would make it for a benchmark shape.

    ``signature`` maps every runtime argument to Triton's type string (``"*bf16"``,
    ``"i32"``, ``"fp32"``); ``constexprs`` holds the compile-time ones (``None`` for absent
    optional pointers); ``aligned`` names the arguments a real launch specialises as
    16-byte aligned pointers or integers divisible by 16 (the benchmark shapes are).
    ``loop_elements`` is how many elements one program handles per iteration of its
    steady-state loop (memory-bound kernels; ``None`` for GEMM-bound ones), ``bytes_moved``
    and ``flops`` what the whole launch must read/write and compute, for the roofline.
    """

    op: str
    kernel: Any  # a triton JITFunction
    role: str
    dtype: torch.dtype
    shape: dict[str, int]
    signature: dict[str, str]
    constexprs: dict[str, Any]
    aligned: tuple[str, ...]
    num_warps: int
    num_stages: int
    grid: tuple[int, ...]
    loop_elements: int | None
    bytes_moved: int
    flops: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        """Block sizes and launch options, as the report prints them."""
        blocks = {k: v for k, v in self.constexprs.items() if k.isupper() and isinstance(v, int)}
        return {**blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}


TRITON_DTYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "u8",
}
