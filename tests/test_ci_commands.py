"""CI runs the README's commands as written: every line it selects exists, once.

``.ci/run``, ``.ci/verl`` and ``.ci/extras`` pick README lines by a fragment (``run_readme VENV
KEY``, ``check NAME KEY``) and run whatever the README says there. A key that matches no line,
or two, would fail CI only at the end of a long run; a README install line that no key selects
would be a command users are told works but CI never runs.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The main job at full length (minutes of training): CI runs its --quick line instead.
NOT_RUN_BY_CI = {"pip install torch==2.13.0 -e '.[demo]' && saei-fast demo"}


def _readme_command_module():
    spec = importlib.util.spec_from_file_location(
        "readme_command", ROOT / ".ci" / "readme_command.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ci_keys() -> list[str]:
    keys = []
    for script in ("run", "verl", "extras"):
        text = (ROOT / ".ci" / script).read_text()
        keys += re.findall(r'^\s*(?:run_readme\s+\S+|check\s+\w+)\s+"([^"]+)"', text, flags=re.M)
    return keys


def test_every_ci_key_selects_exactly_one_readme_line():
    module = _readme_command_module()
    keys = _ci_keys()
    assert len(keys) >= 6  # test suite, verl, trl, bench, demo, lowest versions
    selected = [module.readme_command(key) for key in keys]  # LookupError unless exactly one
    assert "pip install torch==2.13.0 -e '.[test]' && pytest" in selected
    assert len(set(selected)) == len(selected)


def test_every_repository_install_line_of_the_readme_runs_in_ci():
    module = _readme_command_module()
    lines = module.readme_command_lines((ROOT / "README.md").read_text())
    installs = {line for line in lines if line.startswith("pip install") and "-e '.[" in line}
    selected = {module.readme_command(key) for key in _ci_keys()}
    assert installs - NOT_RUN_BY_CI == selected


def test_a_key_matching_two_lines_or_none_is_an_error():
    module = _readme_command_module()
    text = "```bash\npip install a && pytest\npip install b && pytest\n```\n"
    for key in ("pytest", "nothing"):
        try:
            module.readme_command(key, text)
        except LookupError:
            continue
        raise AssertionError(f"{key!r} selected a line")
    assert module.readme_command("install b", text) == "pip install b && pytest"
