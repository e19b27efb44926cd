"""SaEI as a drop-in for TRL's ``GRPOTrainer``: :class:`SaEIConfig` and :class:`SaEIGRPOTrainer`
(:mod:`.trainer`), with :mod:`.parallel` (which distributed setups run) and
:mod:`.vllm_prompts` (the vLLM prompt check)."""

# SUPPORTED_TRL stays reachable under the package's name, outside __all__ as before the move.
from saei_fast.integrations.trl.trainer import (  # noqa: F401
    SUPPORTED_TRL,
    SaEIConfig,
    SaEIGRPOTrainer,
    check_whole_groups_per_process,
)

__all__ = ["SaEIConfig", "SaEIGRPOTrainer", "check_whole_groups_per_process"]
