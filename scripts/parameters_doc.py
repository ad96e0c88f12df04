"""Write docs/parameters.md: every entry point's parameters, read from the same click commands that `--help` prints
(so from the config fields' docstrings), in the MLproject's order. tests/test_docs.py fails when the page and the
code disagree; rerun this then:

    python scripts/parameters_doc.py
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "parameters.md"

HEADER = """# Parameters of every entry point

Generated from the code by `python scripts/parameters_doc.py` (the same text as
`python entrypoints/<name>.py --help`); a test fails when this page and the code disagree. Pass them as
`mlflow run . -e <entry point> --env-manager local -P name=value`, or as `--name value` to the script.
Every value is checked before anything is loaded and all problems are reported at once (see
[failures.md](failures.md)).
"""


def entry_point_command(name: str):
    """The click command of `entrypoints/<name>.py` (importing it loads nothing heavy)."""
    spec = importlib.util.spec_from_file_location(f"entrypoint_{name}", REPO / "entrypoints" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().replace("|", "\\|")


def render() -> str:
    entry_points = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    sections = [HEADER]
    for name in entry_points:
        command = entry_point_command(name)
        rows = [f"| `{param.name}` | {f'`{param.default}`' if param.default else '(empty)'} | {cell(param.help)} |"
                for param in command.params]
        sections.append(f"## `{name}`\n\n{cell(command.help)}\n\n| parameter | default | meaning |\n|---|---|---|\n"
                        + "\n".join(rows) + "\n")
    return "\n".join(sections)


if __name__ == "__main__":
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE.relative_to(REPO)}", file=sys.stderr)
