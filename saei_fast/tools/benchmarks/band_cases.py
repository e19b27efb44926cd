"""Entropy-rank band mask of ``entropy [B, T]`` with a right-padded ``mask [B, T]``.

Latency-bound (a few bytes per token): the numbers that matter are ms and host syncs. The
minimum bytes are reading entropy and mask and writing the mask once. Providers are named
``<name>-<scope>``; each is compared with ours at the same scope:

  ours            saei_fast.entropy_band_mask (argument checks + the select; no host sync on
                  CUDA, where the value checks are device-side assertions)
  ours-nocheck    the registered op alone, as torch.compile runs it (no checks)
  ours-torch      our sort-based PyTorch path on the same device (the CPU implementation)
  torch-sort      per-row torch.sort + rank bounds (sequence scope)
  torch-quantile  torch.quantile thresholds over the valid tokens (batch scope; not the band
                  rule, the usual global-percentile baseline)
"""

from __future__ import annotations

import torch

from saei_fast.tools.benchmarks.cases import FORWARD, OpBench, Provider
from saei_fast.tools.benchmarks.timing import count_host_syncs

__all__ = ["BAND_MASK", "band_inputs", "band_provider", "count_host_syncs"]

BAND = (1 / 3, 2 / 3)
GROUP_SIZE = 4  # divides every shape's rows
# Which scope each provider answers for.
SCOPED_PROVIDERS = [
    ("ours", "sequence"),
    ("ours-nocheck", "sequence"),
    ("ours-torch", "sequence"),
    ("torch-sort", "sequence"),
    ("ours", "group"),
    ("ours", "batch"),
    ("ours-torch", "batch"),
    ("torch-quantile", "batch"),
]
_NOTES = {
    "ours": "band rule, checks included",
    "ours-nocheck": "registered op, no checks",
    "ours-torch": "our PyTorch path",
    "torch-sort": "per-row sort",
    "torch-quantile": "global quantile (not the band rule)",
}


def band_inputs(
    rows: int, width: int, device: str | torch.device, *, seed: int = 0, kind: str = "continuous"
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 entropy ``[rows, width]`` and a right-padded mask whose valid lengths are
    uniform in ``[width / 4, width]`` (RL completions of varying length)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # bf16-like coarse values: many equal entropies
        entropy = torch.randint(0, 8, (rows, width), generator=gen).float() / 4
    else:
        entropy = torch.rand(rows, width, generator=gen) * 4
    lengths = torch.randint(width // 4, width + 1, (rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return entropy.to(device), mask.to(device)


def band_provider(name: str, scope: str, impl: str | None = None):
    """``fn(entropy, mask) -> bool mask`` for provider ``name`` at ``scope``; ``impl`` is what
    the bare registered op runs (default: Triton on CUDA tensors, PyTorch otherwise)."""
    import saei_fast
    from saei_fast.reference import naive_band_mask_quantile, naive_band_mask_sort

    group_size = GROUP_SIZE if scope == "group" else None
    if name == "ours":
        return lambda e, m: saei_fast.entropy_band_mask(
            e, m, band=BAND, scope=scope, group_size=group_size
        )
    if name == "ours-nocheck":
        op = torch.ops.saei_fast.entropy_band_mask

        def nocheck(e, m):
            chosen = impl or ("triton" if e.is_cuda else "torch")
            return op(e, m, None, *BAND, scope, group_size or 1, chosen)

        return nocheck
    if name == "ours-torch":
        return lambda e, m: saei_fast.entropy_band_mask(
            e, m, band=BAND, scope=scope, group_size=group_size, impl="torch"
        )
    if name == "torch-sort":
        return lambda e, m: naive_band_mask_sort(e, m, band=BAND)
    if name == "torch-quantile":
        return lambda e, m: naive_band_mask_quantile(e, m, band=BAND)
    raise ValueError(f"unknown band provider {name!r}")


def _provider(name: str, scope: str) -> Provider:
    def make():
        fn = band_provider(name, scope)
        return lambda entropy, mask: fn(entropy, mask)

    return Provider(
        f"{name}-{scope}",
        make,
        kind="ours" if name.startswith("ours") else "baseline",
        note=_NOTES[name],
        compare_to=f"ours-{scope}",
    )


PROVIDERS = {p.name: p for p in (_provider(name, scope) for name, scope in SCOPED_PROVIDERS)}
# The shapes: 64 responses of 1k and 4k tokens, 16 of 16k.
CUDA_SHAPES = [(64, 1024), (64, 4096), (16, 16384)]


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if device.type == "cuda":
        return CUDA_SHAPES[:1] if quick else CUDA_SHAPES
    # CPU: the shapes with 4x fewer rows.
    return [(8, 1024)] if quick else [(16, 1024), (16, 4096), (4, 16384)]


def _build(dims, device, dtype) -> dict:
    entropy, mask = band_inputs(*dims, device)
    return {"entropy": entropy, "mask": mask}


BAND_MASK = OpBench(
    name="band",
    title="Entropy-rank band mask",
    dims=("B", "T"),
    modes=(FORWARD,),
    providers=PROVIDERS,
    shapes=_shapes,
    dtype=lambda device: torch.float32,
    build=_build,
    # read float32 entropy and the bool mask, write the bool mask
    bytes_moved=lambda dims, mode, dtype: dims[0] * dims[1] * (4 + 2),
    describe=lambda inputs: {"valid_tokens": int(inputs["mask"].sum())},
    count_host_syncs=True,
)
