"""The entropy kernels' launches for the benchmark shapes, as
:class:`~saei_fast.kernels.plan.LaunchPlan` records: what ``saei-fast kernels`` compiles and
reports, through :func:`benchmark_plans`.

Every plan comes from the launchers' own choice (``config.entropy_config``): the same
kernel, tile, warps, splits, grid and compile options as a real launch of that shape.
"""

from __future__ import annotations

import torch
import triton

from saei_fast.kernels.entropy.config import EntropyConfig, entropy_config
from saei_fast.kernels.entropy.kernels import (
    _entropy_bwd_kernel,
    _entropy_fwd_kernel,
    _entropy_fwd_split_kernel,
)
from saei_fast.kernels.plan import TRITON_DTYPE, LaunchPlan, Target

# The benchmark shapes: a long-context batch (rows fill the GPU many times over) and a few
# hundred rows (the vocabulary split), both at Qwen2.5's padded vocabulary.
BENCHMARK_SHAPES = ((8192, 151936), (256, 151936))
BENCHMARK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# fp32 operations per logit, for the roofline's compute side (memory binds by far).
_FLOPS_PER_ELEMENT = {"fwd": 9, "bwd": 8}


def _role_arguments(role: str, config: EntropyConfig, n_rows: int, V: int, dtype, has_labels):
    """``(kernel, pointers, ints, constexprs, optional, bytes_moved)`` of the forward or the
    backward launch: its pointer types, integer arguments, role-specific compile-time
    arguments, the pointers that are absent without labels, and its compulsory traffic."""
    data = f"*{TRITON_DTYPE[dtype]}"
    ints = ["rows_per_outer", "stride_outer", "stride_inner"]
    if role == "fwd":
        split = config.splits > 1
        kernel = _entropy_fwd_split_kernel if split else _entropy_fwd_kernel
        pointers = {
            "logits_ptr": data,
            "labels_ptr": "*i64",
            "mask_ptr": "*u8",
            "entropy_ptr": "*fp32",
            "logprob_ptr": "*fp32",
            "stats_ptr": "*fp32",
        }
        if split:
            pointers |= {"partial_ptr": "*fp32", "count_ptr": "*i32"}
        ints += ["V"] + (["chunk", "n_splits"] if split else [])
        constexprs = {"VEC": config.vec}
        if split:
            constexprs["MAX_SPLITS"] = triton.next_power_of_2(config.splits)
        optional = ("labels_ptr", "logprob_ptr")
        bytes_moved = n_rows * V * dtype.itemsize + n_rows * (16 if has_labels else 12)
    else:
        kernel = _entropy_bwd_kernel
        pointers = {
            "logits_ptr": data,
            "labels_ptr": "*i64",
            "mask_ptr": "*u8",
            "entropy_ptr": "*fp32",
            "stats_ptr": "*fp32",
            "grad_entropy_ptr": "*fp32",
            "grad_logprob_ptr": "*fp32",
            "grad_logits_ptr": data,
        }
        ints += ["stride_grad_row", "V", "chunk"]
        constexprs = {}
        optional = ("labels_ptr", "grad_logprob_ptr")
        bytes_moved = 2 * n_rows * V * dtype.itemsize + n_rows * (28 if has_labels else 16)
    return kernel, pointers, ints, constexprs, optional, bytes_moved


def _plan(target: Target, role: str, n_rows: int, V: int, dtype, has_labels: bool):
    config = entropy_config(target, role, n_rows, V, dtype)
    kernel, pointers, ints, constexprs, optional, bytes_moved = _role_arguments(
        role, config, n_rows, V, dtype, has_labels
    )
    # Benchmarks run with labels and a mask, or with neither.
    absent = () if has_labels else (*optional, "mask_ptr")
    constexprs |= {name: None for name in absent}
    constexprs |= {
        "stride_v": 1,  # contiguous vocabulary: Triton specialises the integer 1
        "HAS_LABELS": has_labels,
        "HAS_MASK": has_labels,
        "BLOCK_V": config.block_v,
    }
    if role == "bwd":
        constexprs["ROUND_TO_BF16"] = False  # the GPU's cast rounds to nearest even
    signature = {name: ty for name, ty in pointers.items() if name not in absent}
    signature |= {name: "i32" for name in ints}
    signature["scale" if role == "fwd" else "inv_t"] = "fp32"
    # A contiguous [N, V] launch: 16-byte aligned pointers, and every stride and size a
    # multiple of 16 (V = 151936 is); rows_per_outer is never specialised, n_splits is small.
    aligned = tuple(
        name
        for name in signature
        if name.endswith("_ptr")
        or name in ("stride_outer", "stride_inner", "stride_grad_row")
        or (name == "V" and V % 16 == 0)
        or (name == "chunk" and config.chunk % 16 == 0)
    )
    return LaunchPlan(
        op="entropy",
        kernel=kernel,
        role=role,
        dtype=dtype,
        shape={"N": n_rows, "V": V},
        signature=signature,
        constexprs=constexprs,
        aligned=aligned,
        num_warps=config.num_warps,
        num_stages=1,
        grid=(n_rows, config.splits) if role == "bwd" or config.splits > 1 else (n_rows,),
        loop_elements=config.block_v,
        bytes_moved=bytes_moved,
        flops=_FLOPS_PER_ELEMENT[role] * n_rows * V,
        extra={
            "options": dict(config.options),
            "labels": has_labels,
            "splits": config.splits,
            "chunk": config.chunk,
        },
    )


def benchmark_plans(target: Target) -> list[LaunchPlan]:
    """What ``launch.entropy_fwd`` / ``launch.entropy_bwd`` launch on ``target`` for the benchmark
    shapes, every dtype, with labels and a mask and without."""
    return [
        _plan(target, role, n_rows, V, dtype, has_labels)
        for n_rows, V in BENCHMARK_SHAPES
        for dtype in BENCHMARK_DTYPES
        for role in ("fwd", "bwd")
        for has_labels in (True, False)
    ]
