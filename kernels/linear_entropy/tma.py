"""The fused linear-entropy forward with its operands loaded by the Hopper Tensor Memory
Accelerator (TMA): an opt-in variant of the default forward (``launch.linear_entropy_fwd``)
for sm_90, with its kernel, device check, launcher and benchmark plans.

What it changes: the weight tile (the big stream, ``[V, D]`` with unit column stride) and,
when every row is computed (``rows`` is None), the hidden tile come through host-built
tensor descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``, passed as kernel
arguments: no device allocator is needed, unlike descriptors made inside a kernel). One TMA
instruction per tile replaces the per-thread address arithmetic and ``cp.async`` copies of
the pointer kernel, and the hardware zero-fills rows past ``N``, columns past ``V`` and the
ragged end of ``D`` (the columns past ``V`` are then set to ``-inf``, as in the default
kernel). The persistent grouped schedule, tile sizes, warps and stages, the statistics
epilogue (``_fold_tile``) and the split merge are those of the default forward, so the
numbers are the same function of the same rounded logits. Gathered rows (``rows``) and a
hidden layout TMA cannot describe are read through pointers, as before.

Compiled for sm_90 (``saei-fast kernels --arch sm_90``, roles ``forward-tma`` and
``frozen-head-tma``; bf16, 128 x 128 x 64 tiles, 8 warps, 3 stages, N = 8192 and the 3456-row
frozen-head chunk, D = 4096): two ``UTMALDG`` and four ``HGMMA`` per 64-deep step, in a loop
of 76 SASS instructions against the pointer kernel's 110 with labels (87 against 102
without): its 8 ``LDGSTS`` and their address arithmetic are gone, for 4 ``BAR`` and 2
mbarrier (``SYNCS``) instructions per step instead of 2 ``BAR``. No spills; 96 KiB of
pipelined shared memory as before. Registers, TMA / default: Triton 3.9 180 / 182 with labels
and 151 / 174 without; Triton 3.6 184 / 170 and 142 / 174: all over 128, so one program per
SM still, with the default's persistent schedule and wave efficiency.

Warp specialisation (``tl.range(..., warp_specialize=True)``) is not used: on sm_90 with 8
warps, Triton 3.6 and 3.9 leave the K loop as it was (the same SASS); with 4 warps both
compile this kernel to an empty function (``EXIT`` only). On a plain 4-warp TMA matmul, 3.6
specialises the K loop but 3.9's ``NVGPUWarpSpecialization`` pass fails; on a persistent
tile loop neither version specialises anything, with 4 or 8 warps.

It is UNMEASURED: nothing here has run on a GPU, so it is not the default. Switch it on
with ``SAEI_LINEAR_TMA=1`` (read by the host's dispatch into ``KernelOptions.linear_tma``):
the host's Triton path (``saei_fast.ops.linear_entropy.triton_path``) then launches this
kernel on sm_90 CUDA devices (and under ``TRITON_INTERPRET=1``, where the tests run it); on
any other device the variable is an error (``RuntimeError``, :func:`check_tma_device`), so
a measurement is never silently of the default kernel. A weight whose layout TMA cannot
describe (column stride not 1, row stride or base address not 16-byte aligned) gets the
default kernel for that call (:func:`tma_selected`). ``bench/gpu_check.py`` times both
forwards side by side.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from saei_fast.kernels.linear_entropy.config import (
    BENCHMARK_DIMS,
    BENCHMARK_ROWS,
    BENCHMARK_VOCAB,
    GemmConfig,
    chunk_rows,
    fwd_schedule,
    gemm_config,
    training_gemms,
)
from saei_fast.kernels.linear_entropy.kernels import _bias_and_mask, _fold_tile, _store_partials
from saei_fast.kernels.linear_entropy.launch import (
    check_blocks,
    check_logits_buffer,
    forward_outputs,
    merge_splits,
)
from saei_fast.kernels.plan import DEFAULT_OPTIONS, TRITON_DTYPE, KernelOptions, LaunchPlan, Target

# The variable that switches the TMA forward on, as its refusal names it (the host's
# dispatch reads it: ``saei_fast.ops.dispatch.LINEAR_TMA_ENV``).
TMA_SWITCH = "SAEI_LINEAR_TMA"

# -------------------------------------------------------------------------------------------
# Kernels
# -------------------------------------------------------------------------------------------


@triton.jit
def _tma_logits_tile(
    hidden_desc,
    hidden_ptr,
    weight_desc,
    bias_ptr,
    o_rows,
    m_n,
    row_start,
    v_start,
    o_cols,
    m_cols,
    D,
    stride_hn,
    stride_hd,
    HAS_BIAS: tl.constexpr,
    HIDDEN_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``_logits_tile`` with the weight (and, with ``HIDDEN_TMA``, the hidden) tile loaded by
    TMA; out-of-range rows, columns and ``D`` entries arrive as 0."""
    o_d = tl.arange(0, BLOCK_D)
    b_acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        d_start = i_d * BLOCK_D
        if HIDDEN_TMA:
            b_h = hidden_desc.load([row_start, d_start])
        else:
            o_dd = d_start + o_d
            p_h = hidden_ptr + o_rows[:, None] * stride_hn + o_dd[None, :] * stride_hd
            b_h = tl.load(p_h, mask=m_n[:, None] & (o_dd < D)[None, :], other=0.0)
        b_w = weight_desc.load([v_start, d_start])  # [BLOCK_V, BLOCK_D], as stored
        # IEEE fp32 products for fp32 operands, as in _logits_tile.
        b_acc = tl.dot(b_h, b_w.T, b_acc, input_precision="ieee")
    return _bias_and_mask(b_acc, bias_ptr, o_cols, m_cols, HAS_BIAS)


@triton.jit(do_not_specialize=["n_rows", "keep_rows", "group_rows", "n_splits"])
def _linear_entropy_tma_fwd_kernel(
    hidden_desc,
    hidden_ptr,
    weight_desc,
    bias_ptr,
    rows_ptr,
    labels_ptr,
    part_m_ptr,
    part_s_ptr,
    part_w_ptr,
    part_label_ptr,
    logits_ptr,
    n_rows,
    keep_rows,
    V,
    D,
    group_rows,
    n_splits,
    stride_hn,
    stride_hd,
    stride_ln,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HIDDEN_TMA: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The schedule of _linear_entropy_fwd_kernel (persistent G x S grid, one flat loop over
    # (row block, tile) pairs); only the operand loads differ.
    pid = tl.program_id(0)
    i_lane = pid % group_rows
    i_split = pid // group_rows
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits)
    v_begin = i_split * tiles_per_split * BLOCK_V
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v_begin, BLOCK_V))
    n_blocks = tl.maximum(tl.cdiv(tl.cdiv(n_rows, BLOCK_N) - i_lane, group_rows), 0)
    b_m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    b_s = tl.zeros((BLOCK_N,), tl.float32)
    b_w = tl.zeros((BLOCK_N,), tl.float32)
    b_label_x = tl.zeros((BLOCK_N,), tl.float32)
    for t in range(0, n_blocks * n_tiles):
        i_tile = t % n_tiles
        i_n = i_lane + (t // n_tiles) * group_rows
        v_start = v_begin + i_tile * BLOCK_V
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < n_rows
        if HAS_ROWS:
            o_rows = tl.load(rows_ptr + o_n, mask=m_n, other=0).to(tl.int64)
        else:
            o_rows = o_n.to(tl.int64)
        o_cols = v_start + tl.arange(0, BLOCK_V)
        m_cols = o_cols < V
        b_x = _tma_logits_tile(
            hidden_desc,
            hidden_ptr,
            weight_desc,
            bias_ptr,
            o_rows,
            m_n,
            i_n * BLOCK_N,
            v_start,
            o_cols,
            m_cols,
            D,
            stride_hn,
            stride_hd,
            HAS_BIAS,
            HIDDEN_TMA,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        # Rounded to the input dtype as in the default kernel (see there).
        b_x = b_x.to(weight_desc.dtype).to(tl.float32)
        b_m, b_s, b_w, b_label_x = _fold_tile(
            b_x,
            i_tile == 0,
            b_m,
            b_s,
            b_w,
            b_label_x,
            labels_ptr,
            logits_ptr,
            o_rows,
            o_n,
            m_n,
            o_cols,
            m_cols,
            v_start,
            keep_rows,
            stride_ln,
            inv_temperature,
            HAS_LABELS,
            STORE_LOGITS,
            BLOCK_V,
        )
        if i_tile == n_tiles - 1:
            _store_partials(
                part_m_ptr,
                part_s_ptr,
                part_w_ptr,
                part_label_ptr,
                i_split * n_rows + o_n,
                m_n,
                b_m,
                b_s,
                b_w,
                b_label_x,
                HAS_LABELS,
            )


# -------------------------------------------------------------------------------------------
# Launch configuration and selection
# -------------------------------------------------------------------------------------------


def tma_config(target: Target, dtype: torch.dtype) -> GemmConfig:
    """The TMA forward's tiles, warps, stages and resident programs per SM: those of the
    default forward (``gemm_config``); the report checks that they still fit one program per
    SM without spilling (``tests/test_kernel_report_tma.py``)."""
    return gemm_config(target, dtype)


def check_tma_device(device: torch.device, interpreting: bool = False) -> None:
    """Raise ``RuntimeError`` unless ``device`` can run the TMA forward: a CUDA device of
    compute capability 9.x (Hopper: TMA and wgmma), or CPU tensors when the kernels run in
    Triton's interpreter (``interpreting``)."""
    if device.type == "cpu" and interpreting:
        return
    if device.type == "cuda" and not getattr(torch.version, "hip", None):
        major, minor = torch.cuda.get_device_capability(device)
        if major == 9:
            return
        found = f"sm_{major}{minor}"
    else:
        found = "a ROCm device" if device.type == "cuda" else f"a {device.type} device"
    raise RuntimeError(
        f"{TMA_SWITCH}=1 selects the TMA forward, which needs an sm_90 CUDA device; got {found} "
        f"({device}). Unset {TMA_SWITCH} to use the default forward."
    )


def _describable(tensor: torch.Tensor) -> bool:
    """Whether TMA can address ``tensor`` (2-D, not empty): unit inner stride, 16-byte
    aligned base and row stride."""
    size = tensor.element_size()
    return (
        tensor.numel() > 0
        and tensor.stride(1) == 1
        and tensor.data_ptr() % 16 == 0
        and (tensor.stride(0) * size) % 16 == 0
    )


def tma_selected(hidden: torch.Tensor, weight: torch.Tensor, options: KernelOptions) -> bool:
    """The host's choice of forward: True when ``options.linear_tma`` asks for the TMA
    forward and ``weight`` can be described (raises on a device that cannot run it, see
    :func:`check_tma_device`); False otherwise (the default forward runs)."""
    if not options.linear_tma:
        return False
    check_tma_device(hidden.device, options.interpreting)
    return _describable(weight)


def _interpreted() -> bool:
    # Whether this kernel runs in the interpreter was fixed when triton.jit made it (an
    # InterpretedFunction, not a JITFunction): a direct call with the default options on
    # CPU tensors runs interpreted too, so ask the kernel object.
    return not isinstance(_linear_entropy_tma_fwd_kernel, triton.runtime.JITFunction)


# -------------------------------------------------------------------------------------------
# Launcher
# -------------------------------------------------------------------------------------------


def linear_entropy_tma_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None,
    labels: torch.Tensor | None,
    inv_temperature: float,
    *,
    logits_out: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None,
    num_splits: int | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``launch.linear_entropy_fwd`` (same arguments, results and numerics) with the
    weight tile, and the hidden tile when ``rows`` is None, loaded by TMA.

    Raises ``ValueError`` when ``weight`` is not TMA-describable (unit column stride, 16-byte
    aligned base and row stride: ``D`` a multiple of 8 in 16-bit, of 4 in fp32), and
    ``RuntimeError`` off sm_90 (see :func:`check_tma_device`).
    """
    check_blocks(blocks)
    if weight.dim() != 2 or not _describable(weight):
        raise ValueError(
            "weight must be [V, D] with unit column stride and 16-byte aligned base and row "
            f"stride for TMA, got shape {tuple(weight.shape)} strides {weight.stride()}"
        )
    check_tma_device(hidden.device, options.interpreting or _interpreted())
    V, D = weight.shape
    entropy, logprobs, stats, n_rows = forward_outputs(hidden, rows, labels)
    if n_rows == 0:
        return entropy, logprobs, stats

    if logits_out is not None:
        check_logits_buffer("logits_out", logits_out, hidden.dtype, V)
    target = options.target(hidden.device)
    config = tma_config(target, hidden.dtype)
    if blocks is not None:
        config = dataclasses.replace(
            config, block_n=blocks[0], block_v=blocks[1], block_d=blocks[2]
        )
    schedule = fwd_schedule(target, config, n_rows, V, num_splits=num_splits)
    hidden_tma = rows is None and _describable(hidden)
    hidden_desc = None
    if hidden_tma:
        hidden_desc = TensorDescriptor.from_tensor(hidden, [config.block_n, config.block_d])
    weight_desc = TensorDescriptor.from_tensor(weight, [config.block_v, config.block_d])
    n_parts = 4 if labels is not None else 3
    parts = torch.empty(n_parts, schedule.splits, n_rows, device=hidden.device)
    has_labels, has_logits = labels is not None, logits_out is not None
    _linear_entropy_tma_fwd_kernel[schedule.grid](
        hidden_desc, None if hidden_tma else hidden, weight_desc, bias, rows, labels,
        parts[0], parts[1], parts[2], parts[3] if has_labels else None, logits_out,
        n_rows, logits_out.shape[0] if has_logits else 0, V, D,
        schedule.group_rows, schedule.splits, hidden.stride(0), hidden.stride(1),
        logits_out.stride(0) if has_logits else 0, inv_temperature,
        HAS_BIAS=bias is not None, HAS_ROWS=rows is not None, HIDDEN_TMA=hidden_tma,
        HAS_LABELS=has_labels, STORE_LOGITS=has_logits,
        BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    merge_splits(rows, labels, parts, entropy, logprobs, stats, V, inv_temperature)
    return entropy, logprobs, stats


# -------------------------------------------------------------------------------------------
# Benchmark plans (``saei-fast kernels``)
# -------------------------------------------------------------------------------------------


def _plan(target: Target, n_rows: int, D: int, labels: bool, role: str, extra: dict):
    """The TMA forward over ``n_rows`` contiguous bf16 rows, keeping the logits of up to one
    chunk, as ``linear_entropy_tma_fwd`` launches it."""
    dtype, V = torch.bfloat16, BENCHMARK_VOCAB
    config = tma_config(target, dtype)
    schedule = fwd_schedule(target, config, n_rows, V)
    data = TRITON_DTYPE[dtype]
    consts = {"hidden_ptr": None, "bias_ptr": None, "rows_ptr": None, "HAS_BIAS": False}
    consts |= {"HAS_ROWS": False, "HIDDEN_TMA": True, "HAS_LABELS": labels, "STORE_LOGITS": True}
    consts |= {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "BLOCK_D": config.block_d}
    # A real launch specialises the unit column stride of a contiguous hidden to 1.
    consts["stride_hd"] = 1
    if not labels:
        consts |= {"labels_ptr": None, "part_label_ptr": None}
    types = {
        "hidden_desc": f"tensordesc<{data}[{config.block_n}, {config.block_d}]>",
        "weight_desc": f"tensordesc<{data}[{config.block_v}, {config.block_d}]>",
        "labels_ptr": "*i64",
        **dict.fromkeys(("part_m_ptr", "part_s_ptr", "part_w_ptr", "part_label_ptr"), "*fp32"),
        "logits_ptr": f"*{data}",
        "stride_hn": "i64",
        "stride_ln": "i64",
        "inv_temperature": "fp32",
    }
    types |= dict.fromkeys(("n_rows", "keep_rows", "V", "D", "group_rows", "n_splits"), "i32")
    kernel = _linear_entropy_tma_fwd_kernel
    kept = min(n_rows, chunk_rows(dtype, V, config.block_n))
    weight_reads = triton.cdiv(triton.cdiv(n_rows, config.block_n), schedule.group_rows)
    aligned = ("logits_ptr", "V", "D", "stride_hn", "stride_ln")
    return LaunchPlan(
        op="linear_entropy",
        kernel=kernel,
        role=role,
        dtype=dtype,
        shape={"N": n_rows, "D": D, "V": V},
        signature={n: types[n] for n in kernel.arg_names if n not in consts},
        constexprs=consts,
        aligned=aligned + (("labels_ptr",) if labels else ()),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        grid=schedule.grid,
        loop_elements=None,
        # As the default forward's plan: hidden once, the weight once per group of row
        # blocks, the kept logits written.
        bytes_moved=(n_rows * D + weight_reads * V * D + kept * V) * dtype.itemsize,
        flops=2 * n_rows * D * V,
        extra={
            **extra,
            "variant": "tma",
            "ctas_per_sm": config.ctas_per_sm,
            "wave_efficiency": schedule.wave_efficiency,
            "work_items": schedule.work_items(n_rows, V, config),
            "group_rows": schedule.group_rows,
            "splits": schedule.splits,
        },
    )


def tma_benchmark_plans(target: Target) -> list[LaunchPlan]:
    """The TMA forward for every ``N x D`` of the linear benchmark grid on ``target``: role
    ``forward-tma`` (the training forward: labels, the first chunk's logits kept) and
    ``frozen-head-tma`` (the attack's forward over one chunk: no labels). None off sm_90
    (TMA is Hopper's; the variant is only selected there)."""
    if target.is_amd or target.arch != 90:
        return []

    chunk = chunk_rows(torch.bfloat16, BENCHMARK_VOCAB, tma_config(target, torch.bfloat16).block_n)
    plans = []
    for n_rows in BENCHMARK_ROWS:
        for D in BENCHMARK_DIMS:
            kept = min(n_rows, chunk)
            train = {"path": "train", "gemms": training_gemms(n_rows, kept), "tokens": n_rows}
            frozen = {"path": "frozen-head", "gemms": 2.0, "tokens": n_rows}
            plans += [
                _plan(target, n_rows, D, True, "forward-tma", train),
                _plan(target, kept, D, False, "frozen-head-tma", frozen),
            ]
    return plans
