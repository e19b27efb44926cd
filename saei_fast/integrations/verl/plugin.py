"""verl plugin entry point (``[project.entry-points."verl.plugins"] saei = ...plugin``).

verl imports this module at ``import verl`` in every process, Ray workers included, so it
imports nothing heavy: it only arranges that, when verl itself first imports one of its
registries, the SaEI entries are added to it:

- ``verl.experimental.agent_loop.agent_loop``: the agent loop ``saei_agent`` as a
  ``{"_target_": ...}`` string entry (instantiated by verl through Hydra, on first use);
- ``verl.trainer.ppo.v1.trainer_base``: the trainer ``saei_sync`` (``trainer.v1.trainer_mode``),
  which installs the SaEI actor worker.

verl loads plugins inside ``try/except`` and logs failures at DEBUG, so a broken plugin would
be silent. Every failure here is logged at ERROR on the ``saei_fast`` logger (which is visible
under verl's WARNING default) and kept in :data:`REGISTRATION_ERRORS` (the list of
:mod:`.registration`, the same object); the SaEI trainer refuses to start while it holds
anything.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable

from saei_fast.integrations.verl.config import AGENT_LOOP_NAME
from saei_fast.integrations.verl.registration import REGISTRATION_ERRORS

logger = logging.getLogger("saei_fast.integrations.verl")

SUPPORTED_VERL = ("0.9.1", "0.10")  # [lo, hi): the extension points read from verl 0.9.1
AGENT_LOOP_TARGET = "saei_fast.integrations.verl.agent_loop.SaEIAgentLoop"


def _register_agent_loop(module) -> None:
    # The same entry verl's own @register decorator writes, by name only: the agent-loop
    # module (and saei_fast's attack) is imported by Hydra when a row first uses it.
    module._agent_loop_registry[AGENT_LOOP_NAME] = {"_target_": AGENT_LOOP_TARGET}


def _register_trainer(module) -> None:
    module.TRAINER_REGISTRY, module.register_trainer  # noqa: B018  (fail here if verl changed)
    if "saei_fast.integrations.verl.trainer" in sys.modules:
        # Importing our trainer module is what imported verl's registry: that module
        # registers itself when its class is defined (see its last lines).
        return
    from saei_fast.integrations.verl.trainer import register

    register(module)


_HOOKS: dict[str, Callable] = {
    "verl.experimental.agent_loop.agent_loop": _register_agent_loop,
    "verl.trainer.ppo.v1.trainer_base": _register_trainer,
}


def _run_hook(name: str, module) -> None:
    try:
        _HOOKS[name](module)
    except Exception as error:  # reported, not swallowed: verl would hide it at DEBUG
        message = f"saei-fast could not register with {name}: {type(error).__name__}: {error}"
        REGISTRATION_ERRORS.append(message)
        logger.error(message, exc_info=True)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs a hook right after verl executes one of the watched modules (their own loader
    does the import; this only wraps it)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Wrapped(spec.loader, fullname)
                return spec
        return None


class _Wrapped(importlib.abc.Loader):
    def __init__(self, loader, name: str) -> None:
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _run_hook(self.name, module)

    def __getattr__(self, item):  # get_code, get_source, ... for tracebacks and inspect
        return getattr(self.loader, item)


def install() -> None:
    """Register now with the registries verl has already imported, later with the others."""
    try:
        _check_verl_version()
    except Exception as error:
        REGISTRATION_ERRORS.append(str(error))
        logger.error(str(error))
        return
    pending = False
    for name in _HOOKS:
        if name in sys.modules:
            _run_hook(name, sys.modules[name])
        else:
            pending = True
    if pending and not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _check_verl_version() -> None:
    from importlib.metadata import version

    from packaging.version import Version

    found = Version(version("verl"))
    if not Version(SUPPORTED_VERL[0]) <= found < Version(SUPPORTED_VERL[1]):
        raise RuntimeError(
            f"saei-fast's verl plugin supports verl >= {SUPPORTED_VERL[0]}, < {SUPPORTED_VERL[1]} "
            f"(pip install 'saei-fast[verl]'); found verl {found}. SaEI is not registered."
        )


install()
