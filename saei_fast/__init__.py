"""saei-fast: fused kernels and drop-in ops for Selective-adversarial Entropy Intervention.

Everything a user calls is re-exported here; docs/design.md is the contract.
"""

from importlib.metadata import PackageNotFoundError, version

from saei_fast import pixels
from saei_fast.attack import AttackConfig, AttackResult, entropy_attack
from saei_fast.ops import (
    band_entropy_objective,
    entropy,
    entropy_band_mask,
    linear_entropy,
    linear_logprobs_and_entropy,
    linear_token_loss,
    logprobs_and_entropy,
)
from saei_fast.rollout import group_advantages

try:
    __version__ = version("saei-fast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AttackConfig",
    "AttackResult",
    "__version__",
    "band_entropy_objective",
    "entropy",
    "entropy_attack",
    "entropy_band_mask",
    "group_advantages",
    "linear_entropy",
    "linear_logprobs_and_entropy",
    "linear_token_loss",
    "logprobs_and_entropy",
    "pixels",
]
