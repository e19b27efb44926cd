"""Launch configuration of the entropy kernels: one function, :func:`entropy_config`, that
both the launchers (``launch``) and the report's plans (``plans``) call, so the report
describes exactly what a launch runs.

For ``n_rows x V`` logits on a :class:`~saei_fast.kernels.plan.Target` it picks the tile
(``block_v`` logits per program and iteration, ``vec`` per thread and 128-bit load), the
warps, the register pin, and whether each row's vocabulary is split into ranges (when there
are too few rows to fill the GPU; see the split kernel in ``kernels``).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from saei_fast.kernels.plan import Target

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
