"""The band op: token-selective entropy, the entropy-rank band mask and the SaEI objective.

- ``op``: the public functions ``entropy_band_mask`` and ``band_entropy_objective``, their
  argument checks, the scopes as runs of the flat token array (``flat_segments``) and the
  ``torch.library`` custom op;
- ``torch_path``: the band rule by stable sorts (CPU tensors, float64, ``impl="torch"``);
- ``triton_path``: the Triton launch path, running the select of ``saei_fast.kernels.band``.
"""

from saei_fast.ops.band.op import band_entropy_objective, entropy_band_mask

__all__ = ["band_entropy_objective", "entropy_band_mask"]
