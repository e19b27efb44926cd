"""Which of accelerate's distributed setups the TRL integration runs SaEI and the fused
head / loss under, read from accelerate's state (its plugins), never by importing
DeepSpeed.

- One process, or DDP (accelerate's multi-CPU / multi-GPU types): everything. The attack
  runs on the unwrapped model, whose parameters are whole on every rank; the fused head and
  loss run through DDP's forward (see ``_fused_head``).
- FSDP (1 and 2): refused for SaEI sampling and for the fused head and loss. The attack and
  the fused head run the base model and read the head's weight directly, outside the FSDP
  root's forward: its hooks (unsharding the root's parameters) would not run, and an FSDP2
  head weight is a sharded DTensor.
- DeepSpeed ZeRO-3: refused for the same reasons (partitioned parameters).
- DeepSpeed ZeRO-0/1/2: SaEI sampling runs (whole parameters on every rank; the attack
  runs on the unwrapped module inside TRL's generation context, as TRL's own generation
  does, and computes no parameter gradient); the fused head and loss are refused, since
  DeepSpeed's engine runs the forward and the backward (loss scaling, gradient
  partitioning) itself.
"""

from __future__ import annotations

from accelerate.utils import DistributedType


def parallel_setup(state: object) -> str | None:
    """The name of a sharding or engine-driven setup in accelerate's ``state``
    (``"FSDP1"``, ``"FSDP2"``, ``"DeepSpeed ZeRO-<stage>"``, ``"Megatron-LM"``), or None for
    one process and DDP."""
    kind = getattr(state, "distributed_type", None)
    if kind == DistributedType.FSDP:
        plugin = getattr(state, "fsdp_plugin", None)
        return f"FSDP{getattr(plugin, 'fsdp_version', 1)}"
    if kind == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        return f"DeepSpeed ZeRO-{getattr(plugin, 'zero_stage', '?')}"
    if kind == DistributedType.MEGATRON_LM:
        return "Megatron-LM"
    return None


def sampling_refusal(setup: str | None) -> str | None:
    """Why SaEI sampling cannot run under ``setup`` (None: it can)."""
    if setup is None or setup in ("DeepSpeed ZeRO-0", "DeepSpeed ZeRO-1", "DeepSpeed ZeRO-2"):
        return None
    return (
        f"the attack runs the base model and reads the output head's weight outside the "
        f"wrapped model's forward, which under {setup} holds sharded parameters"
    )


def fused_refusal(setup: str | None) -> str | None:
    """Why the fused head and loss cannot run under ``setup`` (None: they can)."""
    if setup is None:
        return None
    return (
        f"under {setup} the engine's own forward and backward must run (they run in one "
        "process or under DDP)"
    )
