"""The `saei-fast` command: `info`, the top-level parser and the installed console script.

User errors of every subcommand are in the catalogue (tests/test_catalogue.py); here is what
a working command prints.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import torch

import saei_fast
from saei_fast.cli import main

EXPECTED_BACKEND = "triton" if torch.cuda.is_available() else "torch"


def test_info_reports_versions_and_backends(capsys, monkeypatch):
    monkeypatch.delenv("SAEI_IMPL", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.match(rf"saei-fast +{re.escape(saei_fast.__version__)}\n", out)
    assert re.search(rf"^torch +{re.escape(torch.__version__)}$", out, flags=re.M)
    # Every package row is aligned: the values start in one column.
    rows = out.split("\n\n")[0].splitlines()
    columns = {len(line) - len(line.split(None, 1)[1]) for line in rows}
    assert len(columns) == 1, rows
    for name in ("accelerate", "datasets", "peft", "verl", "matplotlib", "pillow", "flash-attn"):
        assert re.search(rf"^{name} +\S", out, flags=re.M), name
    # On a CPU-only test machine every op runs on the PyTorch path by default.
    for op in ("entropy", "linear_entropy", "entropy_band_mask"):
        assert f"  {op:<30} {EXPECTED_BACKEND}\n" in out


def test_info_reports_a_forced_backend(capsys, monkeypatch):
    # conftest.py sets TRITON_INTERPRET=1 on a machine without a GPU, so Triton can be forced.
    monkeypatch.setenv("SAEI_IMPL", "triton")
    assert main(["info"]) == 0
    assert f"  {'entropy':<30} triton\n" in capsys.readouterr().out


def test_subcommand_flag_errors_name_the_subcommand(capsys):
    # argparse would report a leftover flag under the top-level name, with usage lines.
    try:
        main(["info", "--json"])
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    captured = capsys.readouterr()
    assert captured.err == "saei-fast info: error: unrecognized arguments: --json\n"
    assert captured.out == ""


def test_installed_console_script_runs(tmp_path):
    """The executable that ``pip install`` put on PATH (not ``python -m saei_fast.cli``)."""
    executable = shutil.which("saei-fast")
    assert executable, "the saei-fast console script is not on PATH: pip install -e ."
    result = subprocess.run(
        [executable, "info"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert re.match(rf"saei-fast +{re.escape(saei_fast.__version__)}\n", result.stdout)
    assert "backend per op" in result.stdout
    assert "Traceback" not in result.stderr


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out == f"saei-fast {saei_fast.__version__}\n"
