"""The `saei-fast` command."""

from __future__ import annotations

import subprocess
import sys

from saei_fast.cli import main


def test_info_reports_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "saei-fast" in out and "torch" in out
    # On this (CPU-only) test machine every op runs on the PyTorch path.
    import torch

    expected = "triton" if torch.cuda.is_available() else "torch"
    assert f"entropy                        {expected}" in out


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "saei_fast.cli", "info"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "backend per op" in result.stdout
