"""saei-fast: fused kernels and drop-in ops for Selective-adversarial Entropy Intervention.

Everything a user calls is re-exported here; see DESIGN.md for the contract.
"""

from importlib.metadata import PackageNotFoundError, version

from saei_fast.ops import entropy, logprobs_and_entropy

try:
    __version__ = version("saei-fast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "entropy",
    "logprobs_and_entropy",
]
