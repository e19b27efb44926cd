"""Grid waves and roofline estimates for a compiled kernel on a target GPU.

Both are models, not measurements: the wave count assumes every CTA takes the same time, and
the roofline assumes the kernel reaches the target's peak bandwidth or peak FLOP/s, whichever
binds. ``bench/gpu_check.py`` prints them beside measured times so the model can be judged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from saei_fast.kernels.plan import Target

# Dense peaks other than 16-bit tensor-core FLOP/s (that one is ``Target.dense_flops``), from
# the vendors' data sheets: fp32 through tensor cores (TF32 / XF32; MI250X has no XF32, so its
# fp32 matrix rate) and plain fp32 FMA. MI250X figures are per die, as one torch device is.
TF32_FLOPS = {"sm_90": 494.7e12, "sm_80": 156e12, "gfx942": 653.7e12, "gfx90a": 47.9e12}
FP32_FLOPS = {"sm_90": 66.9e12, "sm_80": 19.5e12, "gfx942": 163.4e12, "gfx90a": 23.9e12}
TENSOR_KINDS = ("wgmma", "mma", "mfma")


def wave_efficiency(
    grid: Sequence[int], ctas_per_sm: int, sm_count: int, work_items: object = None
) -> float:
    """Useful fraction of the CTA slots the grid occupies until its last wave ends.

    ``CTAs / (ceil(CTAs / slots) * slots)`` with ``slots = ctas_per_sm * sm_count``. A
    persistent kernel (grid = resident CTAs) fills its one wave by construction, so its work
    split is what can be unbalanced: ``work_items`` (a count of equal items dealt round-robin,
    or a list of each program's cost) multiplies in ``mean / max`` of the per-program work.
    """
    ctas = math.prod(grid)
    slots = ctas_per_sm * sm_count
    if ctas == 0 or slots == 0:
        return 0.0
    efficiency = ctas / (math.ceil(ctas / slots) * slots)
    if isinstance(work_items, int) and work_items > 0:
        efficiency *= work_items / (ctas * math.ceil(work_items / ctas))
    elif isinstance(work_items, Sequence) and len(work_items) and max(work_items) > 0:
        efficiency *= (sum(work_items) / len(work_items)) / max(work_items)
    return efficiency


def compute_peak(target: Target, dtype: str, mma: str) -> float:
    """Peak FLOP/s for a kernel's input dtype and the MMA kind it compiled to."""
    # A target built from a real device may be named after it (sm_89): use its family's peak.
    family = target.name if target.name in FP32_FLOPS else ("gfx942" if target.is_amd else "sm_90")
    if mma in TENSOR_KINDS:
        return target.dense_flops if dtype in ("bf16", "fp16") else TF32_FLOPS[family]
    return FP32_FLOPS[family]


def estimate_us(target: Target, bytes_moved: int, flops: int, dtype: str, mma: str):
    """Roofline time in microseconds and the bound (``"memory"`` or ``"compute"``)."""
    memory = bytes_moved / target.hbm_bytes_per_s
    compute = flops / compute_peak(target, dtype, mma) if flops else 0.0
    bound = "compute" if compute > memory else "memory"
    return max(memory, compute) * 1e6, bound
