"""The linear-entropy launches for the benchmark shapes, as :class:`LaunchPlan` records:
what ``saei-fast kernels`` compiles and reports (:func:`benchmark_plans`: the default
kernels' plans here, the opt-in TMA forward's from ``tma``).

Every plan comes from the launchers' own choices (``config``): the same tiles,
warps, stages, persistent grid and chunk rows as a real launch of that shape, bf16,
contiguous ``hidden [N, D]`` and lm_head ``[V, D]``, no bias, no mask.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from saei_fast.kernels.linear_entropy.config import (
    BENCHMARK_DIMS,
    BENCHMARK_ROWS,
    BENCHMARK_VOCAB,
    MERGE_BLOCK,
    GemmConfig,
    chunk_rows,
    elementwise,
    fwd_schedule,
    gemm_config,
    grad_grid,
    training_gemms,
)
from saei_fast.kernels.linear_entropy.kernels import (
    _linear_entropy_fwd_kernel,
    _linear_entropy_grad_logits_kernel,
    _merge_splits_kernel,
)
from saei_fast.kernels.linear_entropy.tma import tma_benchmark_plans
from saei_fast.kernels.plan import TRITON_DTYPE, LaunchPlan, Target, even_chunk_rows

# A real launch specialises the unit inner strides of contiguous tensors to the constant 1,
# and marks pointers and sizes / strides that are multiples of 16 as divisible by 16 (the
# benchmark shapes are).
_UNIT_STRIDES = {"stride_hd": 1, "stride_wd": 1}
_ALIGNED_FWD = ("hidden_ptr", "weight_ptr", "logits_ptr", "labels_ptr", "V", "D")
_ALIGNED_FWD += ("stride_hn", "stride_wv", "stride_ln")
_ALIGNED_GRAD = ("hidden_ptr", "weight_ptr", "grad_logits_ptr", "labels_ptr", "V", "D")
_ALIGNED_GRAD += ("stride_hn", "stride_wv", "stride_gn")
_NO_BIAS_NO_ROWS = {"HAS_BIAS": False, "HAS_ROWS": False, "bias_ptr": None, "rows_ptr": None}


@dataclasses.dataclass(frozen=True)
class _Case:
    target: Target
    config: GemmConfig
    dtype: torch.dtype
    n_rows: int
    D: int
    V: int

    @property
    def types(self) -> dict[str, str]:
        data = f"*{TRITON_DTYPE[self.dtype]}"
        types = dict.fromkeys(
            ("hidden_ptr", "weight_ptr", "bias_ptr", "logits_ptr", "grad_logits_ptr"), data
        )
        types |= dict.fromkeys(("rows_ptr", "labels_ptr"), "*i64")
        floats = ("part_m_ptr", "part_s_ptr", "part_w_ptr", "part_label_ptr", "entropy_ptr")
        floats += ("logprob_ptr", "stats_ptr", "grad_entropy_ptr", "grad_logprob_ptr")
        types |= dict.fromkeys(floats, "*fp32")
        ints = ("n_rows", "keep_rows", "V", "D", "group_rows", "n_splits", "row_start")
        types |= dict.fromkeys(ints, "i32")
        types |= dict.fromkeys(("stride_hn", "stride_wv", "stride_ln", "stride_gn"), "i64")
        types["inv_temperature"] = "fp32"
        return types

    def signature(self, kernel, constexprs: dict) -> dict[str, str]:
        types = self.types
        return {name: types[name] for name in kernel.arg_names if name not in constexprs}


def _forward_plan(case: _Case, role: str, rows: int, labels: bool, extra: dict) -> LaunchPlan:
    """The fused forward over ``rows`` rows, keeping the logits of up to one chunk."""
    config, V, D = case.config, case.V, case.D
    schedule = fwd_schedule(case.target, config, rows, V)
    consts = {**_NO_BIAS_NO_ROWS, **_UNIT_STRIDES, "HAS_LABELS": labels, "STORE_LOGITS": True}
    consts |= {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "BLOCK_D": config.block_d}
    if not labels:
        consts |= {"labels_ptr": None, "part_label_ptr": None}
    kept = min(rows, chunk_rows(case.dtype, V, config.block_n))
    weight_reads = triton.cdiv(triton.cdiv(rows, config.block_n), schedule.group_rows)
    return LaunchPlan(
        op="linear_entropy",
        kernel=_linear_entropy_fwd_kernel,
        role=role,
        dtype=case.dtype,
        shape={"N": rows, "D": D, "V": V},
        signature=case.signature(_linear_entropy_fwd_kernel, consts),
        constexprs=consts,
        aligned=_ALIGNED_FWD,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        grid=schedule.grid,
        loop_elements=None,
        # hidden once, the weight once per group of row blocks, the kept logits written.
        bytes_moved=(rows * D + weight_reads * V * D + kept * V) * case.dtype.itemsize,
        flops=2 * rows * D * V,
        extra={
            **extra,
            "ctas_per_sm": config.ctas_per_sm,
            "wave_efficiency": schedule.wave_efficiency,
            "work_items": schedule.work_items(rows, V, config),
            "group_rows": schedule.group_rows,
            "splits": schedule.splits,
        },
    )


def _merge_plan(case: _Case, extra: dict) -> LaunchPlan:
    splits = fwd_schedule(case.target, case.config, case.n_rows, case.V).splits
    consts = {"HAS_ROWS": False, "rows_ptr": None, "HAS_LABELS": True, "BLOCK": MERGE_BLOCK}
    return LaunchPlan(
        op="linear_entropy",
        kernel=_merge_splits_kernel,
        role="forward-merge",
        dtype=case.dtype,
        shape={"N": case.n_rows, "D": case.D, "V": case.V},
        signature=case.signature(_merge_splits_kernel, consts),
        constexprs=consts,
        aligned=("labels_ptr", "V"),
        num_warps=4,
        num_stages=1,
        grid=(triton.cdiv(case.n_rows, MERGE_BLOCK),),
        loop_elements=MERGE_BLOCK,
        bytes_moved=(4 * splits + 5) * case.n_rows * 4,
        flops=0,
        extra={**extra, "splits": splits},
    )


def _grad_plan(
    case: _Case, role: str, rows: int, labels: bool, from_logits: bool, extra: dict
) -> LaunchPlan:
    """The gradient w.r.t. the logits of one chunk: from kept logits (no GEMM, the
    elementwise configuration) or recomputed (the GEMM configuration)."""
    config = elementwise(case.config) if from_logits else case.config
    V, D, size = case.V, case.D, case.dtype.itemsize
    consts = {**_NO_BIAS_NO_ROWS, **_UNIT_STRIDES, "HAS_LABELS": labels}
    consts |= {"FROM_LOGITS": from_logits, "GROUP_N": config.group_n}
    consts |= {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v, "BLOCK_D": config.block_d}
    if not labels:
        consts |= {"labels_ptr": None, "grad_logprob_ptr": None}
    grid = grad_grid(rows, V, config.block_n, config.block_v)
    slots = case.target.sm_count * config.ctas_per_sm
    if from_logits:  # read the logits, write the gradient over them
        bytes_moved = 2 * rows * V * size
    else:  # hidden once, the weight once per group of row blocks, the gradient written
        weight_reads = triton.cdiv(rows, config.block_n * config.group_n)
        bytes_moved = (rows * D + weight_reads * V * D + rows * V) * size
    return LaunchPlan(
        op="linear_entropy",
        kernel=_linear_entropy_grad_logits_kernel,
        role=role,
        dtype=case.dtype,
        shape={"N": rows, "D": D, "V": V},
        signature=case.signature(_linear_entropy_grad_logits_kernel, consts),
        constexprs=consts,
        aligned=_ALIGNED_GRAD,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        grid=grid,
        loop_elements=None,
        bytes_moved=bytes_moved,
        flops=0 if from_logits else 2 * rows * D * V,
        extra={
            **extra,
            "ctas_per_sm": config.ctas_per_sm,
            "wave_efficiency": grid[0] / (triton.cdiv(grid[0], slots) * slots),
        },
    )


def linear_benchmark_plans(target: Target) -> list[LaunchPlan]:
    """Plans for every ``N x D`` of the benchmark grid (``V`` = 151936, bf16).

    Roles: ``forward`` (the training forward: labels, the logits of the first chunk kept),
    ``forward-merge``, ``backward-from-logits`` (the kept rows' gradient, no GEMM),
    ``backward`` (one recomputed chunk, for rows beyond the kept ones; for N within one
    chunk this launch does not happen, and the plan still shows its configuration),
    ``frozen-head`` and ``frozen-head-grad`` (the entropy attack, per chunk: forward keeping
    the logits, then ``dH/dlogits`` in place; ``dH/dhidden`` is one cuBLAS GEMM),
    ``loss-forward`` and ``loss-grad`` (``linear_token_loss``: per chunk of an even split of
    the N rows, the forward keeps every logit of the chunk and the gradient is formed over
    them; ``grad_hidden`` and ``grad_weight`` are cuBLAS GEMMs). ``extra`` holds the path,
    its GEMM count (units of ``2 N D V`` FLOPs, cuBLAS GEMMs included), the resident
    programs per SM (CU), the useful fraction of the GPU over the launch and the case's
    ``tokens`` (a chunk's launch has the chunk's rows as its N); the loss path also its
    ``chunks``.
    """
    dtype = torch.bfloat16
    config = gemm_config(target, dtype)
    V = BENCHMARK_VOCAB
    chunk = chunk_rows(dtype, V, config.block_n)
    plans = []
    for n_rows in BENCHMARK_ROWS:
        for D in BENCHMARK_DIMS:
            case = _Case(target, config, dtype, n_rows, D, V)
            kept = min(n_rows, chunk)
            train = {"path": "train", "gemms": training_gemms(n_rows, kept), "tokens": n_rows}
            frozen = {"path": "frozen-head", "gemms": 2.0, "tokens": n_rows}
            loss_chunk = even_chunk_rows(n_rows, chunk)
            loss = {"path": "loss", "gemms": 3.0, "tokens": n_rows}
            loss["chunks"] = triton.cdiv(n_rows, loss_chunk)
            plans += [
                _forward_plan(case, "forward", n_rows, True, train),
                _merge_plan(case, train),
                _grad_plan(case, "backward-from-logits", kept, True, True, train),
                _grad_plan(case, "backward", chunk, True, False, train),
                _forward_plan(case, "frozen-head", kept, False, frozen),
                _grad_plan(case, "frozen-head-grad", kept, False, True, frozen),
                _forward_plan(case, "loss-forward", loss_chunk, True, loss),
                _grad_plan(case, "loss-grad", loss_chunk, True, True, loss),
            ]
    return plans


def benchmark_plans(target: Target) -> list[LaunchPlan]:
    """Every launch of the linear-entropy paths for the benchmark shapes on ``target``, as
    ``saei-fast kernels`` compiles them: the default kernels', then the opt-in TMA forward's
    (sm_90 only), reported beside the default one."""
    return linear_benchmark_plans(target) + tma_benchmark_plans(target)
