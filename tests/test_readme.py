"""Every Python example of the README, and the scripts in examples/, run as written on a CPU.

Each block runs in a fresh interpreter in an empty folder. Only sizes are shrunk (a full
151936-word vocabulary in the quick start is replaced by a smaller one), so an example whose
API drifts from the library fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Sizes the test may shrink: the examples' real vocabulary and sequence lengths.
SHRINK = [("151936", "2053"), ("(4, 256", "(2, 16"), ("4, 256)", "2, 16)")]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    # Top-level blocks only: an indented block inside a list continues the example above it.
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _run(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_readme_has_its_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 5
    assert any("SaEIGRPOTrainer" in block for block in blocks)
    assert any("entropy_attack" in block for block in blocks)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index, tmp_path):
    code = _python_blocks()[index]
    for old, new in SHRINK:
        code = code.replace(old, new)
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("script", ["ops_quickstart.py", "attack_tiny_vlm.py"])
def test_example_script_runs(script, tmp_path):
    code = Path(ROOT / "examples" / script).read_text()
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
