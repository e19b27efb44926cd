"""Print the one command line of the README's ``bash`` blocks that contains KEY.

CI runs the README's commands as written: it selects a line by a fragment of it (the extra it
installs, say) and runs whatever the README says there, so the two cannot drift apart.

    python3 .ci/readme_command.py "'.[trl]'"
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command_lines(text: str) -> list[str]:
    """Every non-comment line of the README's top-level ``bash`` blocks, stripped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    lines = (line.strip() for block in blocks for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def readme_command(key: str, text: str | None = None) -> str:
    """The README command line containing ``key``; ``LookupError`` unless exactly one does."""
    found = [line for line in readme_command_lines(text or README.read_text()) if key in line]
    if len(found) != 1:
        raise LookupError(f"{len(found)} README command lines contain {key!r}: {found}")
    return found[0]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: readme_command.py KEY")
    try:
        print(readme_command(sys.argv[1]))
    except LookupError as error:
        sys.exit(f"readme_command.py: {error}")
