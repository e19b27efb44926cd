"""verl's tests run in verl's own environment (.ci/verl); elsewhere they are not collected."""

import importlib.metadata
import os
import sys
from pathlib import Path

import pytest


def _verl_installed() -> bool:
    # By distribution, not find_spec("verl"): pytest puts tests/ on sys.path, where this very
    # folder would pass for a namespace package named verl.
    try:
        importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


collect_ignore_glob = [] if _verl_installed() else ["test_*.py"]

HERE = str(Path(__file__).parent)
if HERE not in sys.path:  # the helper modules (_tiny_actor, _tiny_chat), here and in Ray workers
    sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (start-up takes tens of seconds): two CPUs, for
    two workers. Its worker processes inherit PYTHONPATH, so they import the helpers here."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [HERE, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
