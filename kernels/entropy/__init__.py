"""Device side of the entropy op (``saei_fast.ops.entropy``): per-token entropy and label
log-probs from logits, and their gradient w.r.t. the logits.

- ``kernels``: the ``@triton.jit`` functions and the maths they implement;
- ``config``: the launch configuration (tile, warps, vocabulary split) per target;
- ``launch``: the launchers ``entropy_fwd``, ``entropy_bwd`` and ``lse_from_stats``;
- ``plans``: ``benchmark_plans(target)``, the launches ``saei-fast kernels`` compiles.
"""
