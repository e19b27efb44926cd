"""The band-select launches for the benchmark shapes, as :class:`LaunchPlan` records: what
``saei-fast kernels`` compiles and reports (``benchmark_plans``).

Every plan comes from the launcher's own choices (``config``): the same schedule,
tile / chunk, warps, grid and FP-fusion option as a real launch of that shape.
"""

from __future__ import annotations

import torch
import triton

from saei_fast.kernels.band.config import (
    NUM_BINS,
    RADIX_BITS,
    band_config,
    float64_bits,
    layout_bits,
)
from saei_fast.kernels.band.kernels import (
    _band_chunk_pass_kernel,
    _band_chunk_select_kernel,
    _band_segment_kernel,
)
from saei_fast.kernels.plan import TRITON_DTYPE, LaunchPlan, Target

# The benchmark shapes (saei_fast.tools.benchmarks.band_cases): 64 responses of 4096 tokens and
# 16 of 16384, float32 entropy (what the entropy ops return) with a right-padded bool mask, at
# each scope; group scope with 4 responses per prompt, as the benchmark.
BENCHMARK_SHAPES = ((64, 4096), (16, 16384))
BENCHMARK_GROUP_SIZE = 4
BENCHMARK_BAND = (1 / 3, 2 / 3)


def _int_type(value: int) -> str:
    """Triton's type for a Python int argument (as the JIT infers it at launch)."""
    return "i32" if -(2**31) <= value < 2**31 else "i64"


def _plan(kernel, role, target_shape, config, constexprs, runtime, **fields) -> LaunchPlan:
    """A plan whose signature lists ``kernel``'s runtime arguments in order: pointers from
    ``runtime`` (dtype or type string), ints typed by value."""
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        value = runtime[name]
        if isinstance(value, torch.dtype):
            signature[name] = "*" + TRITON_DTYPE[value]
        else:
            signature[name] = _int_type(value)
    pointers = tuple(name for name in signature if signature[name].startswith("*"))
    return LaunchPlan(
        op="band",
        kernel=kernel,
        role=role,
        dtype=torch.float32,
        shape=target_shape,
        signature=signature,
        constexprs=constexprs,
        # Fresh torch allocations: every pointer is 16-byte aligned. The int arguments are
        # all in do_not_specialize (lengths change every batch), so none is specialised.
        aligned=pointers,
        num_warps=config.num_warps,
        num_stages=3,
        flops=0,
        **fields,
    )


def benchmark_plans(target: Target) -> list[LaunchPlan]:
    """The launches ``launch.band_select`` makes for the benchmark shapes on ``target``, per
    scope, through :func:`band_config`. ``bytes_moved`` counts the compulsory traffic of one
    launch (entropy and mask read once, the selection written once); the radix passes
    re-read a segment or chunk that stays in L1/L2, which ``extra`` records."""
    plans = []
    for rows, width in BENCHMARK_SHAPES:
        for scope, seg_len in (
            ("sequence", width),
            ("group", BENCHMARK_GROUP_SIZE * width),
            ("batch", rows * width),
        ):
            plans += _scope_plans(target, rows, width, scope, seg_len)
    return plans


def _scope_plans(target: Target, rows: int, width: int, scope: str, seg_len: int):
    """The launches of one benchmark shape at one scope: one select (schedule ``segment``),
    or a histogram pass and a select (schedule ``chunked``). Its length is the launch
    arguments spelled out as data, one dictionary each."""
    lo_bits, hi_bits = (float64_bits(b) for b in BENCHMARK_BAND)
    n_tokens = rows * width
    n_segments = n_tokens // seg_len
    config = band_config(target, n_tokens, n_segments)
    pos_bits, n_passes = layout_bits(n_tokens, seg_len)
    shape = {"B": rows, "T": width}
    constexprs = {
        "HAS_VALID": True,
        "UNIFORM": True,
        "RADIX_BITS": RADIX_BITS,
        "NUM_BINS": NUM_BINS,
        "bounds_ptr": None,
        "work_seg_ptr": None,
        "work_first_ptr": None,
    }
    runtime = {
        "values_ptr": torch.float32,
        "valid_ptr": torch.uint8,
        "out_ptr": torch.uint8,
        "hist_ptr": torch.int32,
        "state_ptr": torch.int64,
        "seg_len": seg_len,
        "pos_bits": pos_bits,
        "n_passes": n_passes,
        "lo_bits": lo_bits,
        "hi_bits": hi_bits,
        "n_segments": n_segments,
    }
    extra = {
        "scope": scope,
        "schedule": config.schedule,
        "radix_passes": n_passes,
        "options": {"enable_fp_fusion": False},  # as band_select launches
    }
    read_bytes = n_tokens * (4 + 1)  # float32 entropy + bool mask
    if config.schedule == "segment":
        return [
            _plan(
                _band_segment_kernel,
                "select",
                shape,
                config,
                {**constexprs, "TILE": config.tile},
                runtime,
                grid=(n_segments,),
                loop_elements=config.tile,
                bytes_moved=read_bytes + n_tokens,
                # histogram passes until both boundaries resolve, then the select
                extra={**extra, "max_reads_per_token": n_passes + 1},
            )
        ]
    chunks_per_seg = triton.cdiv(seg_len, config.tile)
    n_work = n_segments * chunks_per_seg
    chunk_runtime = {**runtime, "chunks_per_seg": chunks_per_seg, "pass_idx": 0}
    chunk_constexprs = {**constexprs, "CHUNK": config.tile}
    hist_bytes = n_work * 2 * NUM_BINS * 4  # atomics of every chunk's histograms
    return [
        _plan(
            _band_chunk_pass_kernel,
            "histogram pass",
            shape,
            config,
            chunk_constexprs,
            chunk_runtime,
            grid=(n_work,),
            loop_elements=config.tile,
            bytes_moved=read_bytes + hist_bytes,
            # one launch per radix pass; passes after the boundaries resolve read
            # one state record per chunk
            extra={**extra, "launches": n_passes},
        ),
        _plan(
            _band_chunk_select_kernel,
            "select",
            shape,
            config,
            chunk_constexprs,
            chunk_runtime,
            grid=(n_work,),
            loop_elements=config.tile,
            bytes_moved=read_bytes + n_tokens,
            extra={**extra, "launches": 1},
        ),
    ]
