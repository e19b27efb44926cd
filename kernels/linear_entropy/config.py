"""Launch configuration of the linear-entropy GEMM kernels: one place that the launchers
(``launch``, ``tma``) and the benchmark plans (``plans``, what ``saei-fast kernels``
compiles) read, so the report describes exactly what a launch runs.

* ``gemm_config(target, dtype)``: tiles, warps, stages and the verified resident programs per
  SM (CU) of the forward kernel on that target; ``config_for`` with a test's block override;
* ``fwd_schedule``: the forward's persistent grid (``group_rows`` x ``splits`` programs, no
  more than are resident), chosen from ``Target.sm_count`` and ``ctas_per_sm`` so that the
  GPU stays busy until the last tile; ``grad_grid``: the gradient pass's grid;
* ``TUNING_CONFIGS``: what the opt-in search (``SAEI_AUTOTUNE=1``) tries for the grad kernel;
* ``chunk_rows``: rows per ``[c, V]`` chunk (kept logits, gradient
  chunks, the loss head's chunks);
* ``training_gemms``: how many GEMM-sized products the training path runs;
* ``BENCHMARK_ROWS`` / ``BENCHMARK_DIMS`` / ``BENCHMARK_VOCAB``: the shapes the plans of both
  forwards (default and TMA) describe.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from saei_fast.kernels.plan import Target

BENCHMARK_ROWS = (2048, 4096, 8192, 12288, 16384)
BENCHMARK_DIMS = (3584, 4096)
BENCHMARK_VOCAB = 151936

# Rows per program of the kernel that merges the forward's per-split statistics.
MERGE_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of the GEMM kernels for one (target, dtype).

    ``ctas_per_sm`` is how many programs of the forward kernel are resident per SM (CU on
    AMD), from its registers and shared memory as compiled for the target; the table in
    ``gemm_config`` is checked against the compiler by ``tests/test_linear_entropy.py``.
    """

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int
    group_n: int = 8
    # The gradient read back from kept logits has no GEMM: a memory-bound pass with small
    # tiles (32 elements per thread), several programs per SM to hide memory latency.
    ew_block_n: int = 32
    ew_block_v: int = 256
    ew_warps: int = 8
    ew_ctas_per_sm: int = 2

    @property
    def blocks(self) -> tuple[int, int, int]:
        return self.block_n, self.block_v, self.block_d


def gemm_config(target: Target, dtype: torch.dtype) -> GemmConfig:
    """The launch configuration for ``dtype`` operands on ``target``.

    16-bit inputs use tensor cores (wgmma on sm_90, mma on sm_80, MFMA on AMD) with
    128 x 128 output tiles; the fp32 accumulator, the pipelined operands and the entropy
    epilogue take 179-198 registers per thread on sm_90 and 222-236 on sm_80 with 8 warps
    (no spills; compiled, see ``tests/test_linear_entropy.py``), so one program is resident
    per SM, and the forward's persistent grid is sized for that. fp32 inputs
    use IEEE fp32 products (the accuracy an fp32 user expects from a GEMM) with smaller
    tiles so that the pipeline stages of fp32 operands fit in shared memory. AMD: 64 KiB of
    LDS per CU bounds stages x (BLOCK_N + BLOCK_V) x BLOCK_D x bytes (32 KiB here with 2
    stages); warps there are 64-wide wavefronts, so 4 of them cover the elementwise tile.
    """
    if target.is_amd:
        if dtype == torch.float32:
            return GemmConfig(64, 64, 16, 4, 2, ctas_per_sm=2, ew_warps=4, ew_ctas_per_sm=4)
        return GemmConfig(128, 128, 64, 8, 2, ctas_per_sm=1, ew_warps=4, ew_ctas_per_sm=4)
    if dtype == torch.float32:
        return GemmConfig(64, 64, 32, 4, 3, ctas_per_sm=2)
    if target.arch == 80 or (isinstance(target.arch, int) and target.arch < 90):
        # mma.sync keeps its operand fragments in registers: a 64-deep D step takes 247
        # registers with bias and row indices, next to the 255 cap; 32-deep with one more
        # stage takes 222-234.
        return GemmConfig(128, 128, 32, 8, 4, ctas_per_sm=1)
    return GemmConfig(128, 128, 64, 8, 3, ctas_per_sm=1)


def config_for(target: Target, dtype: torch.dtype, blocks) -> GemmConfig:
    """``gemm_config``, with ``blocks = (BLOCK_N, BLOCK_V, BLOCK_D)`` overriding the tiles
    when given (tests use it to cross tile edges)."""
    config = gemm_config(target, dtype)
    if blocks is not None:
        config = dataclasses.replace(
            config, block_n=blocks[0], block_v=blocks[1], block_d=blocks[2]
        )
    return config


def elementwise(config: GemmConfig) -> GemmConfig:
    """The grad kernel's configuration when it reads kept logits (no ``tl.dot``)."""
    return dataclasses.replace(
        config,
        block_n=config.ew_block_n,
        block_v=config.ew_block_v,
        block_d=16,
        num_warps=config.ew_warps,
        num_stages=1,
        ctas_per_sm=config.ew_ctas_per_sm,
    )


@dataclasses.dataclass(frozen=True)
class FwdSchedule:
    """The forward's persistent grid: ``group_rows`` lanes x ``splits`` vocabulary splits."""

    group_rows: int
    splits: int
    wave_efficiency: float

    @property
    def grid(self) -> tuple[int]:
        return (self.group_rows * self.splits,)

    def work_items(self, n_rows: int, V: int, config: GemmConfig) -> list[int]:
        """Tiles each program computes, in program order (``pid = split * G + lane``)."""
        n_blocks = triton.cdiv(max(n_rows, 1), config.block_n)
        n_tiles = triton.cdiv(V, config.block_v)
        per_split = triton.cdiv(n_tiles, self.splits)
        return [
            len(range(lane, n_blocks, self.group_rows))
            * max(0, min(per_split, n_tiles - split * per_split))
            for split in range(self.splits)
            for lane in range(self.group_rows)
        ]


def _useful_fraction(n_blocks: int, n_tiles: int, group: int, splits: int, slots: int) -> float:
    """Tiles computed / (resident slots x tiles of the busiest program): 1.0 when every slot
    of the GPU is busy until the last tile."""
    busiest = triton.cdiv(n_blocks, group) * triton.cdiv(n_tiles, splits)
    return n_blocks * n_tiles / (slots * busiest)


def fwd_schedule(
    target: Target,
    config: GemmConfig,
    n_rows: int,
    V: int,
    *,
    num_splits: int | None = None,
) -> FwdSchedule:
    """Choose ``(group_rows, splits)`` with ``group_rows * splits`` no more than the resident
    programs (``sm_count * ctas_per_sm``), maximising the useful fraction of the GPU; among
    near-ties (within 1%) the largest group, which reads each weight tile from HBM the fewest
    times. ``num_splits`` fixes the split count (tests use it to cross split edges)."""
    slots = target.sm_count * config.ctas_per_sm
    n_blocks = triton.cdiv(max(n_rows, 1), config.block_n)
    n_tiles = triton.cdiv(V, config.block_v)
    candidates = []
    for group in range(1, min(n_blocks, slots) + 1):
        splits = num_splits if num_splits is not None else min(n_tiles, slots // group)
        if num_splits is None and splits < 1:
            continue
        # No empty split: the kernel writes statistics only for splits that own tiles.
        splits = triton.cdiv(n_tiles, triton.cdiv(n_tiles, splits))
        if num_splits is not None and group * splits > max(slots, splits):
            continue
        useful = _useful_fraction(n_blocks, n_tiles, group, splits, slots)
        candidates.append((useful, group, splits))
    if not candidates:  # a fixed split count wider than the GPU: one lane
        splits = triton.cdiv(n_tiles, triton.cdiv(n_tiles, num_splits))
        return FwdSchedule(1, splits, _useful_fraction(n_blocks, n_tiles, 1, splits, slots))
    best = max(useful for useful, _, _ in candidates)
    useful, group, splits = max(
        (c for c in candidates if c[0] >= best - 0.01), key=lambda c: (c[1], c[0])
    )
    return FwdSchedule(group, splits, useful)


def grad_grid(n_rows: int, V: int, block_n: int, block_v: int) -> tuple[int]:
    """One program per (row block, vocabulary tile) of the gradient pass."""
    return (triton.cdiv(n_rows, block_n) * triton.cdiv(V, block_v),)


# Searched with SAEI_AUTOTUNE=1 (the grad kernel only: the forward's grid depends on the
# tile and occupancy of the config, so it keeps the verified table). Every configuration
# here compiles without spills for sm_90 and sm_80; 128 x 256 x 32 with 8 warps (36 B) and
# 128 x 128 x 64 with 4 warps (176 B) spilled and are gone.
TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)
    for (bn, bv, bd), warps, stages in (
        ((128, 128, 64), 8, 3),
        ((128, 128, 64), 8, 4),
        ((64, 128, 64), 4, 3),
        ((64, 128, 64), 8, 3),
        ((128, 64, 64), 4, 3),
        ((128, 64, 64), 8, 3),
        ((64, 64, 64), 4, 3),
    )
]


# The chunk budget of the Triton paths: the logits kept from the forward for the backward,
# and the [c, V] gradient buffer of each backward chunk (one buffer, reused).
CHUNK_BYTES = 1 << 30


def chunk_rows(dtype: torch.dtype, V: int, block_n: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per ``[c, V]`` chunk of the Triton paths: as many as ``budget`` holds, in whole
    row blocks (a chunk's last row block is then full)."""
    rows = budget // (V * dtype.itemsize)
    return max(1, rows // block_n * block_n if rows >= block_n else rows)


def training_gemms(n_rows: int, kept_rows: int) -> float:
    """GEMM-sized products (``2 * rows * D * V`` FLOPs each, in units of all ``n_rows``) on the
    training path: the forward, ``grad_hidden`` and ``grad_weight`` for every row, plus the
    recompute of the rows whose logits were not kept from the forward."""
    return 3.0 + max(0, n_rows - kept_rows) / max(1, n_rows)
