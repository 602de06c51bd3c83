"""Print one of the README's two commands: ``python3 tools/readme_commands.py first|second``.

The README marks each with ``<!-- readme-command: NAME -->`` followed by a one-line ``bash`` block.
``.ci/run`` runs exactly what this prints, and ``tests/test_readme.py`` checks both.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"<!-- readme-command: (\w+) -->\s*```bash\n(.*?)\n```", re.S)


def commands(text: str | None = None) -> dict[str, str]:
    """``{"first": ..., "second": ...}`` from the README text, in order."""
    text = README.read_text() if text is None else text
    found = {name: body.strip() for name, body in _BLOCK.findall(text)}
    for name, body in found.items():
        if "\n" in body:
            raise SystemExit(f"README command {name!r} must be one line, got:\n{body}")
    return found


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python3 tools/readme_commands.py first|second")
    cmds = commands()
    if sys.argv[1] not in cmds:
        raise SystemExit(f"README.md has no command {sys.argv[1]!r}; it has: {', '.join(cmds) or 'none'}")
    print(cmds[sys.argv[1]])
