"""The band op's Triton path on the host: the band select of ``saei_fast.kernels.band``,
launched with the options the dispatch reads now (``saei_fast.ops.dispatch.kernel_options``).

The launcher is imported inside the function: importing it imports Triton, which the package
does not need on its PyTorch path.
"""

from __future__ import annotations

import torch

from saei_fast.ops.dispatch import kernel_options


def band_mask_triton(
    values: torch.Tensor,
    valid: torch.Tensor | None,
    lo: float,
    hi: float,
    *,
    seg_len: int | None = None,
    bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Band-select ``values [N]`` (float16 / bfloat16 / float32) scope by scope, as
    ``torch_path.band_mask_torch``; bool ``[N]``. No host synchronisation."""
    from saei_fast.kernels.band.launch import band_select

    return band_select(
        values, valid, lo, hi, seg_len=seg_len, bounds=bounds, options=kernel_options()
    )
