"""The verl plugin's record of registration failures, shared by the plugin and the trainer.

:mod:`.plugin` appends to :data:`REGISTRATION_ERRORS` every failure to register with verl
(verl would log it at DEBUG only); :mod:`.trainer` refuses to start while it holds anything.
It lives here, apart from both, because the plugin imports the trainer (to register it) and
the trainer must read the record without importing the plugin back.
"""

from __future__ import annotations

REGISTRATION_ERRORS: list[str] = []
