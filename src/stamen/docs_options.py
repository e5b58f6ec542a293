"""Generates ``docs/options.md`` from the option registry, so the docs cannot drift.

``python -m stamen.docs_options`` rewrites the file; a unit test fails when the file in
the repository differs from what this produces (an option added without regenerating).
"""

from __future__ import annotations

import sys
from pathlib import Path

from stamen.config.options import options_reference

HEADER = """# Options

Every option can be given on the command line (`--name=value` or `--name value`, dashes
and underscores alike), as an environment variable (`FLOWER_NAME`), or as a top-level
name in the configuration file (`--conf`, default `flowerconfig.py`). The command line
wins over the file, and the file over the environment, as in Flower.

This page is generated from the option registry (`python -m stamen.docs_options`).

| option | type | default | environment | meaning |
|---|---|---|---|---|
"""


def render() -> str:
    lines = [HEADER]
    for opt in options_reference():
        flag = opt["flag"] if opt["command_line"] else f"`{opt['name']}` (config file only)"
        if opt["command_line"]:
            flag = f"`{flag}`"
        meaning = opt["help"].replace("|", "\\|")
        env = f"`{opt['env']}`" if opt["command_line"] else "—"
        lines.append(f"| {flag} | {opt['type']} | `{opt['default']}` | {env} | {meaning} |\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    target = Path(argv[0] if argv else "docs/options.md")
    target.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
