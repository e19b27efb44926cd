"""Which of accelerate's distributed setups the TRL integration runs SaEI and the fused
head / loss under, read from accelerate's state (its plugins), never by importing
DeepSpeed.

- One process, or DDP (accelerate's multi-CPU / multi-GPU types): everything. The attack
  runs on the unwrapped model, whose parameters are whole on every rank; the fused head and
  loss run through DDP's forward (see :mod:`saei_fast.integrations.shared.fused_head`).
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

import torch
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def parallel_setup(state: object, model: torch.nn.Module | None = None) -> str | None:
    """The name of a sharding or engine-driven setup in accelerate's ``state``
    (``"FSDP1"``, ``"FSDP2"``, ``"DeepSpeed ZeRO-<stage>"``, ``"Megatron-LM"``), or of a
    ``model`` sharded before it reached the trainer (torch's ``fully_shard``, or DTensor
    parameters), or None for one process and DDP."""
    if model is not None:
        if any(isinstance(module, FSDPModule) for module in model.modules()):
            return "FSDP2"
        if any(isinstance(param, DTensor) for param in model.parameters()):
            return "sharded (DTensor) parameters"
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


def refuse(setup: str | None, config) -> None:
    """Raise ``ValueError`` naming the setting for what ``config`` (a ``SaEIConfig``) asks
    and ``setup`` cannot run."""
    if setup is None:
        return
    if config.saei_enabled and (reason := sampling_refusal(setup)) is not None:
        raise ValueError(
            f"saei_enabled=True is not supported with {setup}: {reason}; train with DDP (or "
            "DeepSpeed ZeRO-2) or set saei_enabled=False"
        )
    for name in ("saei_fused_head", "saei_fused_loss"):
        if getattr(config, name) and (reason := fused_refusal(setup)) is not None:
            raise ValueError(f"{name}=True is not supported here: {reason}")
