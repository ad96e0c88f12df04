"""The package's layers, as docs/architecture.md draws them: imports run downwards only (the shared machinery imports
neither the command line nor what users run; `experiments/`, `report/` and `team/` import none of each other), and
the module map names every module. Read from the source (no module imported), so it costs nothing."""

import ast
import re
from pathlib import Path

import pytest
from support.paths import REPO

PACKAGE = REPO / "src" / "finetune_lab"
# What users run, one package each; none imports another.
ON_TOP = ("experiments", "report", "team")
# The table of entry points and what turns its rows into commands and files: it names the experiments as text.
COMMAND_LINE = ("entry_points", "cli", "project_files")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every `finetune_lab` module `path` imports, anywhere in it (in functions, under TYPE_CHECKING), as dotted
    names; `from finetune_lab import x` counts as importing `finetune_lab.x`."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return {name for name in names if name.split(".")[0] == "finetune_lab"}


def layer(module: str) -> tuple[int, str]:
    """(height, group) of a module: a module may import a lower layer, or its own group."""
    top = module.split(".")[1] if "." in module else ""
    if top in ON_TOP:
        return 2, top
    if top in COMMAND_LINE:
        return 1, "command line"
    return 0, "shared"


def upward(path: Path) -> list[str]:
    """The imports of `path` that run back up (or across, between the packages on top)."""
    height, group = layer(module_name(path))
    found = []
    for target in sorted(imported(path)):
        target_height, target_group = layer(target)
        if target_height > height or (target_height == height and target_group != group):
            found.append(f"{module_name(path)} imports {target} ({group} -> {target_group})")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up(path):
    assert upward(path) == []


def test_an_import_running_back_up_is_found(tmp_path, monkeypatch):
    """The check can fail: a shared module importing an experiment, and the report importing one."""
    shared = tmp_path / "finetune_lab" / "plots.py"
    report = tmp_path / "finetune_lab" / "report" / "sections.py"
    report.parent.mkdir(parents=True)
    shared.write_text("def figure():\n    from finetune_lab.experiments import classify\n")
    report.write_text("from ..experiments.sweep import ChildSpec\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "finetune_lab")
    assert upward(shared) == ["finetune_lab.plots imports finetune_lab.experiments "
                              "(shared -> experiments)",
                              "finetune_lab.plots imports finetune_lab.experiments.classify (shared -> experiments)"]
    assert upward(report) == ["finetune_lab.report.sections imports finetune_lab.experiments.sweep "
                              "(report -> experiments)",
                              "finetune_lab.report.sections imports finetune_lab.experiments.sweep.ChildSpec "
                              "(report -> experiments)"]


def test_the_module_map_names_every_module():
    page = (REPO / "docs" / "architecture.md").read_text()
    module_map = page.split("## Module map")[1].split("```")[1]
    named = set(re.findall(r"^ *([\w/]+\.py|\w+/) ", module_map, re.MULTILINE))
    for path in MODULES:
        name = f"{path.parent.name}/" if path.name == "__init__.py" else path.name
        if path.parent != PACKAGE or path.name != "__init__.py":
            assert name in named, f"docs/architecture.md's module map leaves out {path.relative_to(PACKAGE)}"
