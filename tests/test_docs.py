"""The README and docs/ stay true to the code: the parameter page is generated, links resolve, and the pages speak
to users (no issue numbers, no paths outside the repository)."""

import re

import pytest
from conftest import REPO

from finetune_lab.cli import entry_point
from finetune_lab.entry_points import ENTRY_POINTS

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("row", ENTRY_POINTS, ids=lambda row: row.name)
def test_the_parameter_page_lists_every_option_of_every_entry_point(row):
    """(The page is generated: tests/test_project_files.py checks it is what `make generate` writes.)"""
    section = (REPO / "docs" / "parameters.md").read_text().split(f"## `{row.name}`")[1].split("\n## ")[0]
    for param in entry_point(row.name).params:
        assert f"| `{param.name}` |" in section, param.name


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
