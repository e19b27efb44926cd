"""Per-token entropy and label log-probs from logits: Triton kernels and their launchers.

Forward. Each program streams a range of one row's vocabulary in tiles ``[LANES, VEC]``: a
thread owns ``VEC`` contiguous logits of a lane (one 128-bit load) and keeps that lane's
running statistics in registers, ``m`` (max of the raw logits x), ``s = sum 2^d`` and
``w = sum 2^d * d`` with ``d = (x - m) * log2(e) / T``. The loop reduces only inside a thread
(no shuffle, no barrier); the lanes are merged once per range at the end. ``exp2`` with one
runtime multiplier ``scale = log2(e) / T`` is the only transcendental per logit. Then
``H = ln 2 * (log2 s - w / s)`` and ``ln s = ln 2 * log2 s``; only ``H``, the label log-prob and
the row statistics ``(m, ln s)`` are written (no softmax tensor; ``lse = m / T + ln s``).
Shifting by the maximum before scaling keeps every quantity small, so large logits lose no
precision to ``x / T`` rounding or to the cancellation of ``lse - E[z]``; every exponent is
clamped at -200 (where ``2^d`` is exactly 0 in fp32), so ``-inf`` logits and differences of
logits near +-3e38 that overflow to ``-inf`` add exactly 0 instead of ``0 * -inf = NaN``.

Vocabulary split. When there are too few rows to fill the GPU, each row's vocabulary is cut
into ``splits`` ranges, one program each; every program writes its partial ``(m, s, w)``
and the last one to finish a row (an atomic counter) merges them and writes the outputs.

Backward: recompute ``log p = (x - m) / T - ln s`` tile by tile and write
``dL/dlogits = [g_H * p * (-log p - H) + g_logp * (onehot(label) - p)] / T``
in the logits' dtype. ``-inf`` logits have ``p = 0`` and get gradient 0 (never NaN). Any
number of programs may share a row (no reduction).

A row whose logits are all ``-inf`` has no distribution: its entropy and log-prob are NaN.
Masked rows (mask False) are not read: their outputs and gradients are exactly 0; in the
backward a row whose upstream gradients are both 0 counts as masked (its gradient is 0 even
when its logits are not finite). An out-of-range label gives a NaN log-prob (the host check
catches it outside compile).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from saei_fast.kernels.plan import TRITON_DTYPE, LaunchPlan, Target, target_for

LOG2E_VALUE = 1.4426950408889634
LOG2E = tl.constexpr(LOG2E_VALUE)
LN2 = tl.constexpr(0.6931471805599453)
# 2^x is exactly 0 in fp32 below -150; exponents are clamped here (see _clamp_exponent).
EXPONENT_FLOOR = tl.constexpr(-200.0)

# -------------------------------------------------------------------------------------------
# Kernels
# -------------------------------------------------------------------------------------------


@triton.jit
def _clamp_exponent(t):
    # 2^t is exactly 0 for t <= -200, so the clamp changes no sum, but keeps -inf (a -inf
    # logit, or a difference that overflowed) out of 0 * d. NaN (a NaN logit) stays NaN.
    return tl.maximum(t, EXPONENT_FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _lane_update(b_x, b_m, b_s, b_w, scale):
    """Fold a tile ``b_x [LANES, VEC]`` (fp32) into the per-lane statistics ``[LANES]``."""
    m_new = tl.maximum(b_m, tl.max(b_x, axis=1))
    # A lane that has seen only -inf has no finite maximum to shift by: any reference works.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = _clamp_exponent((b_m - m_ref) * scale)
    rescale = tl.exp2(shift)
    b_d = _clamp_exponent((b_x - m_ref[:, None]) * scale)
    b_e = tl.exp2(b_d)
    # Re-basing w from the old to the new maximum: sum 2^(d + shift) * (d + shift).
    b_w = rescale * (b_w + shift * b_s) + tl.sum(b_e * b_d, axis=1)
    b_s = rescale * b_s + tl.sum(b_e, axis=1)
    return m_new, b_s, b_w


@triton.jit
def _merge(b_m, b_s, b_w, scale):
    """Merge the statistics of several lanes (or programs) ``[K]`` into one ``(m, s, w)``."""
    m = tl.max(b_m, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    shift = _clamp_exponent((b_m - m_ref) * scale)
    rescale = tl.exp2(shift)
    s = tl.sum(rescale * b_s, axis=0)
    w = tl.sum(rescale * (b_w + shift * b_s), axis=0)
    return m, s, w


@triton.jit
def _range_stats(p_row, v_lo, v_hi, stride_v, scale, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """``(m, s, w)`` of the logits ``p_row[v_lo:v_hi]``: full tiles without masks, then one
    masked tail."""
    LANES: tl.constexpr = BLOCK_V // VEC
    o_x = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    b_m = tl.full((LANES,), float("-inf"), tl.float32)
    b_s = tl.zeros((LANES,), tl.float32)
    b_w = tl.zeros((LANES,), tl.float32)
    v_end = v_lo + (v_hi - v_lo) // BLOCK_V * BLOCK_V
    for v_start in range(v_lo, v_end, BLOCK_V):
        b_x = tl.load(p_row + (v_start + o_x) * stride_v).to(tl.float32)
        b_m, b_s, b_w = _lane_update(b_x, b_m, b_s, b_w, scale)
    if v_end < v_hi:
        o_cols = v_end + o_x
        # Lanes past the range load -inf, so they add 2^-200 = 0 and never 2^0.
        b_x = tl.load(p_row + o_cols * stride_v, mask=o_cols < v_hi, other=float("-inf"))
        b_m, b_s, b_w = _lane_update(b_x.to(tl.float32), b_m, b_s, b_w, scale)
    return _merge(b_m, b_s, b_w, scale)


@triton.jit
def _row_pointer(logits_ptr, i_row, rows_per_outer, stride_outer, stride_inner):
    # Leading dims may be non-contiguous: the row lives at (outer, inner) of a 3-D view.
    p_row = logits_ptr + (i_row // rows_per_outer) * stride_outer
    return p_row + (i_row % rows_per_outer) * stride_inner


@triton.jit
def _write_entropy(entropy_ptr, stats_ptr, i_row, m, s, w):
    """Store ``H`` and the row statistics ``(m, ln s)``; return ``log2 s``."""
    log2_s = tl.log2(s)
    tl.store(entropy_ptr + i_row, (log2_s - w / s) * LN2)
    tl.store(stats_ptr + 2 * i_row, m)
    tl.store(stats_ptr + 2 * i_row + 1, log2_s * LN2)
    return log2_s


@triton.jit
def _write_logprob(p_row, labels_ptr, logprob_ptr, i_row, m, log2_s, stride_v, V, scale):
    label = tl.load(labels_ptr + i_row).to(tl.int64)
    in_range = (label >= 0) & (label < V)
    b_label = tl.load(p_row + label * stride_v, mask=in_range, other=0.0).to(tl.float32)
    logprob = ((b_label - m) * scale - log2_s) * LN2
    tl.store(logprob_ptr + i_row, tl.where(in_range, logprob, float("nan")))


@triton.jit
def _write_masked_row(entropy_ptr, logprob_ptr, stats_ptr, i_row, HAS_LABELS: tl.constexpr):
    tl.store(entropy_ptr + i_row, 0.0)
    tl.store(stats_ptr + 2 * i_row, 0.0)
    tl.store(stats_ptr + 2 * i_row + 1, 0.0)
    if HAS_LABELS:
        tl.store(logprob_ptr + i_row, 0.0)


@triton.jit(do_not_specialize=["rows_per_outer"])
def _entropy_fwd_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    rows_per_outer,
    stride_outer,
    stride_inner,
    stride_v,
    V,
    scale,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    """One program per row: the whole vocabulary, then the outputs."""
    i_row = tl.program_id(0).to(tl.int64)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + i_row) != 0
    if valid:
        p_row = _row_pointer(logits_ptr, i_row, rows_per_outer, stride_outer, stride_inner)
        m, s, w = _range_stats(p_row, 0, V, stride_v, scale, BLOCK_V, VEC)
        log2_s = _write_entropy(entropy_ptr, stats_ptr, i_row, m, s, w)
        if HAS_LABELS:
            _write_logprob(p_row, labels_ptr, logprob_ptr, i_row, m, log2_s, stride_v, V, scale)
    else:
        _write_masked_row(entropy_ptr, logprob_ptr, stats_ptr, i_row, HAS_LABELS)


@triton.jit(do_not_specialize=["rows_per_outer"])
def _entropy_fwd_split_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    entropy_ptr,
    logprob_ptr,
    stats_ptr,
    partial_ptr,
    count_ptr,
    rows_per_outer,
    stride_outer,
    stride_inner,
    stride_v,
    V,
    chunk,
    n_splits,
    scale,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    """Program (row, split) takes ``chunk`` logits of the row; the last to finish merges."""
    i_row = tl.program_id(0).to(tl.int64)
    i_split = tl.program_id(1)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + i_row) != 0
    if valid:
        p_row = _row_pointer(logits_ptr, i_row, rows_per_outer, stride_outer, stride_inner)
        v_lo = i_split * chunk
        m, s, w = _range_stats(
            p_row, v_lo, tl.minimum(v_lo + chunk, V), stride_v, scale, BLOCK_V, VEC
        )
        p_part = partial_ptr + (i_row * n_splits + i_split) * 3
        tl.store(p_part, m)
        tl.store(p_part + 1, s)
        tl.store(p_part + 2, w)
        # Every thread's partial store happens before the release of the counter.
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + i_row, 1, sem="acq_rel", scope="gpu")
        if done == n_splits - 1:
            o_split = tl.arange(0, MAX_SPLITS)
            m_split = o_split < n_splits
            p_parts = partial_ptr + i_row * n_splits * 3 + o_split * 3
            # .cg: read the other programs' partials from L2, never from a stale L1 line.
            b_m = tl.load(p_parts, mask=m_split, other=float("-inf"), cache_modifier=".cg")
            b_s = tl.load(p_parts + 1, mask=m_split, other=0.0, cache_modifier=".cg")
            b_w = tl.load(p_parts + 2, mask=m_split, other=0.0, cache_modifier=".cg")
            m, s, w = _merge(b_m, b_s, b_w, scale)
            log2_s = _write_entropy(entropy_ptr, stats_ptr, i_row, m, s, w)
            if HAS_LABELS:
                _write_logprob(p_row, labels_ptr, logprob_ptr, i_row, m, log2_s, stride_v, V, scale)
    elif i_split == 0:
        _write_masked_row(entropy_ptr, logprob_ptr, stats_ptr, i_row, HAS_LABELS)


@triton.jit
def _grad_tile(b_x, o_cols, row_max, ln_s, inv_t, g_scale, g_offset, g_label, label):
    """dL/dlogits of one tile: ``p * (g_scale * log p + g_offset)``, plus ``g_label`` at the
    label (``g_scale = -g_H / T``, ``g_offset = -(g_H H + g_logp) / T``). Natural-log units
    as in the forward's statistics: where ``-log p`` and ``H`` nearly cancel, every extra
    rounding of ``log p`` would show in the gradient."""
    b_logp = _clamp_exponent((b_x.to(tl.float32) - row_max) * inv_t - ln_s)
    b_g = tl.exp2(b_logp * LOG2E) * (g_scale * b_logp + g_offset)
    return tl.where(o_cols == label, b_g + g_label, b_g)


@triton.jit
def _to_output(b_g, out_ty: tl.constexpr, ROUND_TO_BF16: tl.constexpr):
    if ROUND_TO_BF16:
        # Triton's CPU interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even:
        # round the fp32 bits here so that its cast is exact (NaN is left as it is).
        bits = b_g.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        b_g = tl.where(b_g == b_g, bits.to(tl.float32, bitcast=True), b_g)
    return b_g.to(out_ty)


@triton.jit(do_not_specialize=["rows_per_outer"])
def _entropy_bwd_kernel(
    logits_ptr,
    labels_ptr,
    mask_ptr,
    entropy_ptr,
    stats_ptr,
    grad_entropy_ptr,
    grad_logprob_ptr,
    grad_logits_ptr,
    rows_per_outer,
    stride_outer,
    stride_inner,
    stride_v,
    stride_grad_row,
    V,
    chunk,
    inv_t,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr,
):
    """Program (row, split) writes the gradient of ``chunk`` logits of the row."""
    i_row = tl.program_id(0).to(tl.int64)
    v_lo = tl.program_id(1) * chunk
    v_hi = tl.minimum(v_lo + chunk, V)
    v_end = v_lo + (v_hi - v_lo) // BLOCK_V * BLOCK_V
    o_v = tl.arange(0, BLOCK_V)
    p_grad = grad_logits_ptr + i_row * stride_grad_row
    out_ty = grad_logits_ptr.dtype.element_ty

    g_entropy = tl.load(grad_entropy_ptr + i_row).to(tl.float32)
    g_logprob = 0.0
    label = -1
    if HAS_LABELS:
        g_logprob = tl.load(grad_logprob_ptr + i_row).to(tl.float32)
    valid = (g_entropy != 0.0) | (g_logprob != 0.0)
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + i_row) != 0)
    if valid:
        p_row = _row_pointer(logits_ptr, i_row, rows_per_outer, stride_outer, stride_inner)
        row_max = tl.load(stats_ptr + 2 * i_row)
        ln_s = tl.load(stats_ptr + 2 * i_row + 1)
        entropy = tl.load(entropy_ptr + i_row)
        g_scale = -g_entropy * inv_t
        g_offset = -(g_entropy * entropy + g_logprob) * inv_t
        g_label = g_logprob * inv_t
        if HAS_LABELS:
            label = tl.load(labels_ptr + i_row).to(tl.int32)
        for v_start in range(v_lo, v_end, BLOCK_V):
            b_x = tl.load(p_row + (v_start + o_v) * stride_v)
            b_g = _grad_tile(
                b_x, o_v, row_max, ln_s, inv_t, g_scale, g_offset, g_label, label - v_start
            )
            tl.store(p_grad + v_start + o_v, _to_output(b_g, out_ty, ROUND_TO_BF16))
        if v_end < v_hi:
            o_cols = v_end + o_v
            m_cols = o_cols < v_hi
            b_x = tl.load(p_row + o_cols * stride_v, mask=m_cols, other=float("-inf"))
            b_g = _grad_tile(b_x, o_cols, row_max, ln_s, inv_t, g_scale, g_offset, g_label, label)
            tl.store(p_grad + o_cols, _to_output(b_g, out_ty, ROUND_TO_BF16), mask=m_cols)
    else:
        zeros = tl.zeros((BLOCK_V,), tl.float32).to(out_ty)
        for v_start in range(v_lo, v_end, BLOCK_V):
            tl.store(p_grad + v_start + o_v, zeros)
        if v_end < v_hi:
            tl.store(p_grad + v_end + o_v, zeros, mask=v_end + o_v < v_hi)


# -------------------------------------------------------------------------------------------
# Launch configuration: one function for the launchers and for benchmark_plans
# -------------------------------------------------------------------------------------------

_THREADS = 256
# Bytes of one row a thread handles per loop iteration: two 128-bit loads in the forward,
# one load and one store in the backward. With 8 programs of 256 threads per SM that keeps
# 32-64 KiB of loads in flight per SM without software pipelining.
_THREAD_BYTES = {"fwd": 32, "bwd": 16}
# Registers per thread are pinned so that exactly 8 programs of 256 threads are resident
# per SM (the thread limit binds, whatever the register allocator does), which is what the
# split rule plans with; every shipped configuration compiles to <= 32 without spilling.
_MAX_REGISTERS = 32
_AMD_WAVES_PER_SIMD = 8  # the same pin on AMD: 8 waves per SIMD = 64 VGPRs
# A row is split only into ranges of at least this many tiles, so that the per-range
# epilogue (one cross-lane merge, three stores, an atomic) stays small next to the stream.
_MIN_TILES_PER_SPLIT = 4
_WAVE_TARGET = 0.9


@dataclasses.dataclass(frozen=True)
class EntropyConfig:
    """How one entropy kernel launch covers ``n_rows x V`` logits.

    ``block_v`` logits per program per loop iteration, ``vec`` contiguous ones per thread
    and load (128 bits), ``splits`` programs per row, each taking ``chunk`` logits (a whole
    number of tiles; the whole row when ``splits == 1``). ``options`` are the compile
    options the launch passes (the register pin).
    """

    block_v: int
    vec: int
    num_warps: int
    splits: int
    chunk: int
    options: tuple[tuple[str, int], ...]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _programs_per_sm(target: Target, num_warps: int) -> int:
    """Resident programs per SM (CU on AMD) under the register pin of ``_options``."""
    if target.is_amd:
        return max(1, 4 * _AMD_WAVES_PER_SIMD // num_warps)
    threads = num_warps * target.warp_size
    by_registers = 65536 // (_MAX_REGISTERS * threads)
    return max(1, min(64 // num_warps, by_registers, 32))


def _options(target: Target) -> tuple[tuple[str, int], ...]:
    if target.is_amd:
        return (("waves_per_eu", _AMD_WAVES_PER_SIMD),)
    return (("maxnreg", _MAX_REGISTERS),)


def _wave_efficiency(programs: int, slots: int) -> float:
    return programs / (_cdiv(programs, slots) * slots)


@functools.lru_cache(maxsize=1024)
def _fewest_filling_splits(
    target: Target, n_rows: int, tiles: int, num_warps: int
) -> tuple[int, float]:
    """Balanced ranges of whole tiles, at least _MIN_TILES_PER_SPLIT each: the fewest whose
    grid fills 90% of its waves of resident programs, else the fullest; with its efficiency."""
    slots = target.sm_count * _programs_per_sm(target, num_warps)
    splits, best = 1, -1.0
    for candidate in range(1, tiles + 1):
        if candidate > 1 and _cdiv(tiles, candidate) < _MIN_TILES_PER_SPLIT:
            break
        effective = _cdiv(tiles, _cdiv(tiles, candidate))  # after rounding to tiles
        efficiency = _wave_efficiency(max(1, n_rows) * effective, slots)
        if efficiency > best:
            splits, best = candidate, efficiency
        if efficiency >= _WAVE_TARGET:
            break
    return splits, best


def entropy_config(
    target: Target,
    role: str,
    n_rows: int,
    V: int,
    dtype: torch.dtype,
    *,
    block_v: int | None = None,
    splits: int | None = None,
) -> EntropyConfig:
    """The launch configuration of ``role`` (``"fwd"`` or ``"bwd"``) for ``n_rows x V``
    logits of ``dtype`` on ``target``.

    The vocabulary is split only when the rows alone would leave SMs idle: ``splits`` is the
    smallest count whose grid fills at least 90% of its waves of resident programs. Tests
    override ``block_v`` (a power of two) and ``splits`` to cross tile and range edges with
    small vocabularies.
    """
    if role not in _THREAD_BYTES:
        raise ValueError(f"role must be 'fwd' or 'bwd', got {role!r}")
    element_size = dtype.itemsize
    vec = 16 // element_size  # one 128-bit load per thread
    default_tile = block_v is None
    if block_v is None:
        tile = _THREADS * _THREAD_BYTES[role] // element_size
        block_v = min(tile, max(vec, triton.next_power_of_2(V)))
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    vec = min(vec, block_v)
    threads = min(_THREADS, max(1, block_v // vec))
    num_warps = max(1, threads // target.warp_size)

    tiles = _cdiv(V, block_v)
    if splits is None:
        splits, best = _fewest_filling_splits(target, n_rows, tiles, num_warps)
        finer_possible = default_tile and block_v // 2 >= vec * threads
        if best < _WAVE_TARGET and splits > 1 and finer_possible:
            # Ranges are whole tiles, so a coarse tile may allow no split count that fills
            # the GPU (38 tiles of 4096 split into 8 or 10 ranges, never 9): half tiles give
            # twice the choices at the same per-thread load width.
            finer = _cdiv(V, block_v // 2)
            finer_splits, finer_best = _fewest_filling_splits(target, n_rows, finer, num_warps)
            if finer_best > best:
                block_v, tiles, splits = block_v // 2, finer, finer_splits
    elif splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    chunk = _cdiv(tiles, min(splits, tiles)) * block_v
    # After rounding the ranges to whole tiles none may be empty.
    splits = _cdiv(V, chunk)
    return EntropyConfig(block_v, vec, num_warps, splits, chunk, _options(target))


# -------------------------------------------------------------------------------------------
# Launchers
# -------------------------------------------------------------------------------------------


def _autotune_enabled() -> bool:
    return os.environ.get("SAEI_AUTOTUNE", "0") not in ("", "0")


@functools.cache
def _tuned(kernel, element_size: int, restore: tuple[str, ...] = ()):
    # Opt-in search (SAEI_AUTOTUNE=1) over whole-row launches. The key holds the vocabulary
    # size only: completion lengths change every RL batch and must not trigger a new search.
    # Every candidate keeps at most 32 bytes of a row per thread, as the shipped tiles do.
    configs = [
        triton.Config({"BLOCK_V": warps * 32 * per_thread // element_size}, num_warps=warps)
        for warps in (4, 8, 16)
        for per_thread in (16, 32)
    ]
    return triton.autotune(
        configs, key=["V", "HAS_LABELS", "HAS_MASK"], restore_value=list(restore)
    )(kernel)


def lse_from_stats(stats: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """Log-sum-exp of ``logits / T`` from the forward's ``stats [..., 2]``."""
    return stats[..., 0] * inv_temperature + stats[..., 1]


def _log2_scale(inv_temperature: float) -> float:
    # log2(e) / T, rounded once to fp32 by the launch. For T < ~4e-39 it would overflow to
    # inf (0 * inf = NaN for the maximum logit); FLT_MAX gives the same one-hot distribution.
    return min(inv_temperature * LOG2E_VALUE, torch.finfo(torch.float32).max)


def _rows_view(logits: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` as a 3-D view ``[outer, inner, V]`` without copying when the
    leading dims allow it (plain ``[B, T, V]`` slices such as ``logits[:, :-1]`` always do)."""
    V = logits.shape[-1]
    if logits.dim() == 1:
        view = logits.view(1, 1, V)
    elif logits.dim() == 2:
        view = logits.unsqueeze(0)
    elif logits.dim() == 3:
        view = logits
    else:
        try:
            view = logits.view(-1, logits.shape[-2], V)
        except RuntimeError:  # leading dims that cannot be merged: one copy of the logits
            view = logits.reshape(-1, logits.shape[-2], V)
    if view.stride(2) != 1 and V * view.stride(2) >= 2**31:
        # Offsets inside a row are 32-bit in the kernels.
        view = view.contiguous()
    return view


def _flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
    # Per-row tensors are indexed with stride 1 in the kernels; autograd hands over
    # expanded (stride-0) gradients, so materialise them.
    return None if tensor is None else tensor.reshape(-1).contiguous()


def _mask_bytes(mask: torch.Tensor | None) -> torch.Tensor | None:
    mask = _flat(mask)
    return None if mask is None else mask.view(torch.uint8)


def _interpreter_bf16(dtype: torch.dtype) -> bool:
    # See _to_output: only the CPU interpreter needs the explicit rounding.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _flags(labels: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, bool]:
    return {"HAS_LABELS": labels is not None, "HAS_MASK": mask is not None}


def _launch_options(config: EntropyConfig) -> dict:
    return {
        "BLOCK_V": config.block_v,
        "num_warps": config.num_warps,
        "num_stages": 1,
        **dict(config.options),
    }


def entropy_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    inv_temperature: float,
    *,
    block_v: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel on ``logits [..., V]``.

    Returns ``(entropy, logprobs or None, stats)``: float32 shaped like the token dims, and
    ``stats [..., 2]`` = (row max of the raw logits, log-sum-exp of ``(x - max) / T``), what the
    backward needs (see :func:`lse_from_stats`). ``block_v`` and ``splits`` override the
    configuration (see :func:`entropy_config`).
    """
    token_shape = logits.shape[:-1]
    V = logits.shape[-1]
    view = _rows_view(logits)
    n_rows = view.shape[0] * view.shape[1]
    device = logits.device
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device)
    stats = torch.empty(n_rows, 2, dtype=torch.float32, device=device)
    logprobs = torch.empty_like(entropy) if labels is not None else None
    if n_rows:
        config = entropy_config(
            target_for(device), "fwd", n_rows, V, logits.dtype, block_v=block_v, splits=splits
        )
        args = [view, _flat(labels), _mask_bytes(mask), entropy, logprobs, stats]
        shape = [view.shape[1], view.stride(0), view.stride(1), view.stride(2), V]
        scale = _log2_scale(inv_temperature)
        flags = _flags(labels, mask) | {"VEC": config.vec}
        if config.splits > 1:
            partials = torch.empty(n_rows * config.splits * 3, dtype=torch.float32, device=device)
            counts = torch.zeros(n_rows, dtype=torch.int32, device=device)
            _entropy_fwd_split_kernel[(n_rows, config.splits)](
                *args, partials, counts, *shape, config.chunk, config.splits, scale, **flags,
                MAX_SPLITS=triton.next_power_of_2(config.splits), **_launch_options(config),
            )  # fmt: skip
        elif block_v is None and _autotune_enabled():
            tuned = _tuned(_entropy_fwd_kernel, logits.element_size())
            tuned[(n_rows,)](*args, *shape, scale, **flags)
        else:
            kernel = _entropy_fwd_kernel[(n_rows,)]
            kernel(*args, *shape, scale, **flags, **_launch_options(config))
    return (
        entropy.view(token_shape),
        None if logprobs is None else logprobs.view(token_shape),
        stats.view(*token_shape, 2),
    )


def entropy_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    entropy: torch.Tensor,
    stats: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    inv_temperature: float,
    *,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: gradient of ``sum(g_H * H + g_logp * logp)`` w.r.t. the
    logits, written in the logits' dtype into ``out`` (a new contiguous tensor if None;
    ``out`` may be ``logits`` itself, since every element is read before it is written, by
    the same thread). Rows that are masked, or whose ``g_H`` and ``g_logp`` are both 0, get
    exactly 0."""
    V = logits.shape[-1]
    view = _rows_view(logits)
    n_rows = view.shape[0] * view.shape[1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    elif not out.is_contiguous() or out.shape != logits.shape:
        raise ValueError("out must be a contiguous tensor shaped like logits")
    grad_rows = out.view(n_rows, V)
    if grad_logprobs is None:  # no log-prob in the loss: the label term is 0
        labels = None
    if n_rows:
        config = entropy_config(
            target_for(logits.device), "bwd", n_rows, V, logits.dtype, block_v=block_v,
            splits=splits,
        )  # fmt: skip
        args = [
            view, _flat(labels), _mask_bytes(mask), _flat(entropy), _flat(stats),
            _flat(grad_entropy), _flat(grad_logprobs), grad_rows, view.shape[1],
            view.stride(0), view.stride(1), view.stride(2), grad_rows.stride(0), V,
        ]  # fmt: skip
        flags = _flags(labels, mask) | {"ROUND_TO_BF16": _interpreter_bf16(logits.dtype)}
        if config.splits == 1 and block_v is None and _autotune_enabled():
            # The gradient may overwrite the logits it reads: restore them between trials.
            tuned = _tuned(_entropy_bwd_kernel, logits.element_size(), ("logits_ptr",))
            tuned[(n_rows, 1)](*args, V, inv_temperature, **flags)
        else:
            kernel = _entropy_bwd_kernel[(n_rows, config.splits)]
            kernel(*args, config.chunk, inv_temperature, **flags, **_launch_options(config))
    return out


# -------------------------------------------------------------------------------------------
# Launch plans for the compile-time report (saei-fast kernels)
# -------------------------------------------------------------------------------------------

# The benchmark shapes: a long-context batch (rows fill the GPU many times over) and a few
# hundred rows (the vocabulary split), both at Qwen2.5's padded vocabulary.
BENCHMARK_SHAPES = ((8192, 151936), (256, 151936))
BENCHMARK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# fp32 operations per logit, for the roofline's compute side (memory binds by far).
_FLOPS_PER_ELEMENT = {"fwd": 9, "bwd": 8}


def _plan(target: Target, role: str, n_rows: int, V: int, dtype, has_labels: bool):
    config = entropy_config(target, role, n_rows, V, dtype)
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
    """What :func:`entropy_fwd` / :func:`entropy_bwd` launch on ``target`` for the benchmark
    shapes, every dtype, with labels and a mask and without."""
    return [
        _plan(target, role, n_rows, V, dtype, has_labels)
        for n_rows, V in BENCHMARK_SHAPES
        for dtype in BENCHMARK_DTYPES
        for role in ("fwd", "bwd")
        for has_labels in (True, False)
    ]
