"""The README and docs/ stay true to the code: the parameter page is generated, links resolve, and the pages speak
to users (no issue numbers, no paths outside the repository)."""

import importlib.util
import re

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def parameters_doc():
    spec = importlib.util.spec_from_file_location("parameters_doc", REPO / "scripts" / "parameters_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_parameter_page_is_what_the_code_says():
    module = parameters_doc()
    assert module.PAGE.read_text() == module.render(), "docs/parameters.md is stale: python scripts/parameters_doc.py"


def test_the_parameter_page_lists_every_option_of_every_entry_point():
    module = parameters_doc()
    page = module.PAGE.read_text()
    for name in ("classify", "classify_sweep", "lora_sweep", "retrain_probe", "generate", "report", "bench"):
        for param in module.entry_point_command(name).params:
            assert f"| `{param.name}` |" in page.split(f"## `{name}`")[1].split("\n## ")[0], (name, param.name)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if not re.match(r"[a-z]+:", target):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_speak_to_users(page):
    text = page.read_text()
    assert not re.search(r"\bissues? #?\d+|#\d{1,3}\b", text, re.IGNORECASE), "an issue number"
    assert not re.search(r"(?<![\w.])(/work/|\.\./shared)", text), "a path outside the repository"


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
