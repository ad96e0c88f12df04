"""The entry points' command line: `--help` answers without importing the heavy libraries, and shows each option's
type and default."""

import json
import subprocess
import sys

import pytest
from support.paths import REPO

from finetune_lab.entry_points import ENTRY_POINTS

# Run an entry point's `--help` as a user does, then list the top-level modules that were imported.
HELP_THEN_MODULES = """
import json, runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""
HEAVY = {"torch", "transformers", "peft", "datasets", "mlflow", "sklearn", "matplotlib", "pandas"}


@pytest.mark.parametrize("row", ENTRY_POINTS, ids=lambda row: row.name)
def test_help_imports_no_heavy_library_and_shows_types_and_defaults(row):
    shown = subprocess.run([sys.executable, "-c", HELP_THEN_MODULES, str(REPO / "entrypoints" / f"{row.name}.py")],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    *help_lines, modules = shown.stdout.strip().splitlines()
    assert not HEAVY & set(json.loads(modules))
    text = " ".join(" ".join(help_lines).split())
    assert "--experiment TEXT" in text and f"[default: {row.experiment}]" in text


def test_help_names_integer_float_and_list_types():
    shown = subprocess.run([sys.executable, str(REPO / "entrypoints" / "lora_sweep.py"), "--help"],
                           capture_output=True, text=True, timeout=120)
    text = " ".join(shown.stdout.split())
    for option in ("--batch-size INTEGER", "--learning-rate FLOAT", "--ranks INT,INT,...", "[default: 4,8,16,32]",
                   "[default: 0.0002]"):
        assert option in text
