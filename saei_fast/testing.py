"""Deprecated alias of :mod:`saei_fast.tools.testing` (tiny test VLMs, processors and
batches), kept because earlier releases documented ``from saei_fast.testing import ...``.
Importing it warns once with a DeprecationWarning.
"""

import warnings

from saei_fast.tools import testing as _testing
from saei_fast.tools.testing import *  # noqa: F403  (the alias re-exports every public name)

__all__ = _testing.__all__

warnings.warn(
    "saei_fast.testing is deprecated: import from saei_fast.tools.testing instead",
    DeprecationWarning,
    stacklevel=2,  # the importing module (warnings skips the import machinery's frames)
)
