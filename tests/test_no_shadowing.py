"""The repository root on ``sys.path`` shadows no installed distribution.

transformers (>= 5.25) imports Hugging Face's ``kernels`` distribution. Our Triton code lives
in a top-level folder of the same name; were it a regular package, ``python -m pytest``,
``python -c ...`` and any subprocess started in the root would import it instead and fail
inside transformers. The check runs in a fresh interpreter started at the root with the root
first on ``sys.path``, as those commands do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.metadata, importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
from transformers import Qwen2_5_VLProcessor  # imports the `kernels` distribution
import kernels
import saei_fast.kernels, saei_fast.kernels.entropy.launch
try:
    dist = importlib.metadata.distribution("kernels")
    dist_files = [str(dist.locate_file(f)) for f in dist.files or () if f.name == "__init__.py"]
except importlib.metadata.PackageNotFoundError:
    dist_files = []
print(json.dumps({
    "path0": sys.path[0],
    "kernels_file": getattr(kernels, "__file__", None),
    "kernels_path": list(getattr(kernels, "__path__", [])),
    "dist_init_files": dist_files,
    "ours_init": saei_fast.kernels.__file__,
    "ours_module": saei_fast.kernels.entropy.launch.__file__,
}))
"""


def test_repository_root_first_on_sys_path_shadows_no_kernels_distribution():
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])

    assert Path(found["path0"]).resolve() == ROOT
    # Whatever `kernels` resolves to, it is not a module of this repository...
    kernels_file = found["kernels_file"]
    assert kernels_file is None or ROOT not in Path(kernels_file).resolve().parents
    # ...and where the distribution is installed (transformers >= 5.25 requires it), it is that.
    if found["dist_init_files"]:
        assert any(
            Path(kernels_file).resolve() == Path(init).resolve()
            for init in found["dist_init_files"]
        ), found
    # Ours is still a regular package whose modules are the top-level kernels/ folder's.
    assert Path(found["ours_init"]).name == "__init__.py"
    assert Path(found["ours_module"]).resolve() == ROOT / "kernels" / "entropy" / "launch.py"


def test_kernels_folder_is_not_a_regular_package():
    # The mechanism the test above relies on: without an __init__.py the folder is at most a
    # namespace portion, which any installed regular package of the same name outranks.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "saei_fast" / "kernels" / "__init__.py").exists()
