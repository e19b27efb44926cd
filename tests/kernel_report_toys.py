"""Toy kernels with known compiled properties, to test ``saei_fast.tools.kernel_report`` itself
independently of the shipped kernels (imported by the report's compile workers, which run
without ``TRITON_INTERPRET``).

Each plan's role names the property it pins down:

- ``copy-scalar`` / ``copy-aligned``: the same streaming loop without and with the 16-byte
  alignment hints of a real launch; only the hints allow 128-bit loads.
- ``dot``: one ``tl.dot`` of 16-bit tiles (tensor cores: wgmma on sm_90, mma on sm_80, MFMA
  on AMD); ``dot-ieee`` the same in fp32 with IEEE products (FMAs, no tensor cores).
- ``reduce-in-loop``: a CTA-wide sum inside the loop (a barrier per iteration).
- ``register-heavy``: an 8192-element fp32 tile per warp kept live across a reduction: far
  more than 255 registers per thread, so it must spill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from saei_fast.kernels.plan import LaunchPlan, Target


@triton.jit
def _toy_copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o_x = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK * tl.num_programs(0)):
        o = start + o_x
        b_x = tl.load(x_ptr + o, mask=o < n)
        tl.store(y_ptr + o, b_x * 2, mask=o < n)


@triton.jit
def _toy_dot_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    o_m = tl.arange(0, BLOCK)
    b_acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):
        b_a = tl.load(a_ptr + o_m[:, None] * K + (k + o_m)[None, :])
        b_b = tl.load(b_ptr + (k + o_m)[:, None] * BLOCK + o_m[None, :])
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=PRECISION)
    tl.store(c_ptr + o_m[:, None] * BLOCK + o_m[None, :], b_acc)


@triton.jit
def _toy_reduce_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    b_total = tl.zeros((), tl.float32)
    for start in range(0, n, BLOCK):
        o = start + tl.arange(0, BLOCK)
        b_x = tl.load(x_ptr + o, mask=o < n, other=0.0).to(tl.float32)
        b_total += tl.sum(b_x * b_x, axis=0)
    tl.store(out_ptr, b_total)


@triton.jit
def _toy_heavy_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    b_x = tl.load(x_ptr + o)
    b_exp = tl.exp(b_x)
    tl.store(y_ptr + o, b_exp / tl.sum(b_exp, axis=0))


def _copy(target: Target, role: str, aligned: tuple[str, ...]) -> LaunchPlan:
    # 8 bf16 elements (16 bytes) per thread per iteration: one 128-bit access when aligned.
    block = 8 * 4 * target.warp_size
    n = 1 << 24
    return LaunchPlan(
        op="toy",
        kernel=_toy_copy_kernel,
        role=role,
        dtype=torch.bfloat16,
        shape={"n": n},
        signature={"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32"},
        constexprs={"BLOCK": block},
        aligned=aligned,
        num_warps=4,
        num_stages=1,
        grid=(2 * target.sm_count,),
        loop_elements=block,
        bytes_moved=4 * n,
        flops=0,
    )


def _dot(target: Target, role: str, dtype: torch.dtype, precision: str) -> LaunchPlan:
    name = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    return LaunchPlan(
        op="toy",
        kernel=_toy_dot_kernel,
        role=role,
        dtype=dtype,
        shape={"K": 4096},
        signature={"a_ptr": name, "b_ptr": name, "c_ptr": "*fp32", "K": "i32"},
        constexprs={"BLOCK": 64, "PRECISION": precision},
        aligned=("a_ptr", "b_ptr", "c_ptr", "K"),
        num_warps=4,
        num_stages=2,
        grid=(1,),
        loop_elements=None,
        bytes_moved=2 * 64 * 4096 * dtype.itemsize,
        flops=2 * 64 * 64 * 4096,
    )


def benchmark_plans(target: Target) -> list[LaunchPlan]:
    aligned = ("x_ptr", "y_ptr", "n")
    return [
        _copy(target, "copy-scalar", ()),
        _copy(target, "copy-aligned", aligned),
        _dot(target, "dot", torch.bfloat16, "tf32"),
        _dot(target, "dot-ieee", torch.float32, "ieee"),
        LaunchPlan(
            op="toy",
            kernel=_toy_reduce_kernel,
            role="reduce-in-loop",
            dtype=torch.float32,
            shape={"n": 1 << 20},
            signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
            constexprs={"BLOCK": 2048},
            aligned=("x_ptr", "out_ptr", "n"),
            num_warps=8,
            num_stages=1,
            grid=(1,),
            loop_elements=2048,
            bytes_moved=4 << 20,
            flops=0,
        ),
        LaunchPlan(
            op="toy",
            kernel=_toy_heavy_kernel,
            role="register-heavy",
            dtype=torch.float32,
            shape={"n": 8192},
            signature={"x_ptr": "*fp32", "y_ptr": "*fp32"},
            constexprs={"BLOCK": 8192},
            aligned=("x_ptr", "y_ptr"),
            num_warps=1,
            num_stages=1,
            grid=(1,),
            loop_elements=None,
            bytes_moved=8 * 8192,
            flops=0,
        ),
    ]
