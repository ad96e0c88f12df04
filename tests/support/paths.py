"""The repository, and its entry point scripts imported to drive their click commands in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def entrypoint(name: str):
    """Import `entrypoints/<name>.py` (a script, not a package) to drive its click command in-process."""
    spec = importlib.util.spec_from_file_location(f"entrypoint_{name}", REPO / "entrypoints" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
