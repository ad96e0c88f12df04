"""The README and docs/ stay true to the code: the parameter page is generated, links resolve, and the pages speak
to users (no issue numbers, no paths outside the repository)."""

import re

import pytest
from support.paths import REPO

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


def anchors(page):
    """The anchors GitHub gives the page's headings (code blocks are not headings)."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_to_a_section_find_it(page):
    for target, anchor in re.findall(r"\]\(([^)#\s]+\.md)#([^)\s]+)\)", page.read_text()):
        assert anchor in anchors(page.parent / target), f"{page.name} links to {target}#{anchor}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_speak_to_users(page):
    text = page.read_text()
    assert not re.search(r"\bissues? #?\d+|#\d{1,3}\b", text, re.IGNORECASE), "an issue number"
    assert not re.search(r"(?<![\w.])(/work/|\.\./shared)", text), "a path outside the repository"


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


# A measured figure: a duration ("2 min 14 s", "41 s", "9.4 s", "1.31 ms"), a speed-up ("6.30×", "0.83x") or a
# throughput ("1,100 tokens/s"). Whole-number ratios ("5x") are targets, and no pattern matches a setting such as a
# timeout, an interval ("every 3 s") or a budget ("15 minutes"), which the allow-list below would otherwise fill.
FIGURE = re.compile(
    r"(?<![\w.,])(?:\d+ min \d+ s|\d+(?:\.\d+)? (?:ms|s)(?![\w/])|\d+\.\d+ ?[×x](?!\w)"
    r"|\d[\d,]*(?:\.\d+)? (?:real )?tok(?:en)?s/s)"
)
MEASUREMENTS = REPO / "docs" / "measurements.md"
SUITE_TIMES = "the test suite's times, which the tests' own page states"
# Figures other pages may state although docs/measurements.md does not: (page, figures, why).
NOT_MEASUREMENTS = [
    (
        "performance.md",
        {"14 ms", "30 s", "45 ms", "25 ms", "100 ms", "75 s", "86 s", "70 ms", "83 s", "50 ms", "4 min 45 s",
         "343 s", "358 s", "1.5x", "90 s"},
        "the GPU plan's estimates and time limits, and the GPU figures reported before the project had a GPU",
    ),
    ("testing.md", {"1 min 18 s", "2 min 0 s", "10 min 10 s", "14 min 4 s", "10 min 8 s", "200 s", "100 s", "125 s",
                    "9 min 36 s"}, SUITE_TIMES),
]


def prose(page):
    """The page's text without its code blocks (commands, console output), with line breaks as spaces."""
    return re.sub(r"\s+", " ", re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL))


def figures_not_measured(page, measured):
    allowed = set().union(*(figures for name, figures, _ in NOT_MEASUREMENTS if name == page.name))
    return [figure for figure in FIGURE.findall(prose(page)) if figure not in measured and figure not in allowed]


@pytest.mark.parametrize("page", [page for page in PAGES if page != MEASUREMENTS], ids=lambda p: p.name)
def test_a_measured_figure_is_quoted_as_measured_or_linked(page):
    """Every measured figure lives in docs/measurements.md with its date, commit and machine; another page quotes
    it exactly as there, or links to it."""
    stray = figures_not_measured(page, prose(MEASUREMENTS))
    assert not stray, f"{page.name} states {stray}, which docs/measurements.md does not: move them there and link"


def test_the_figure_check_catches_a_quote_that_disagrees(tmp_path):
    page = tmp_path / "sweeps.md"
    page.write_text("Wall time 2 min 15 s for the whole run, 9.5 s a child, 6.31× the baseline, 1,200 tokens/s.\n")
    measured = "Wall time 2 min 14 s, 9.5 s a child, 6.30× the baseline, 1,100 tokens/s."
    assert figures_not_measured(page, measured) == ["2 min 15 s", "6.31×", "1,200 tokens/s"]


def test_every_measurement_says_when_where_and_at_which_commit():
    for section in MEASUREMENTS.read_text().split("\n## ")[1:]:
        first = section.split("\n\n")[1]
        assert re.match(r"\*Measured \d{4}-\d{2}-\d{2}\b.*\bcommits? [0-9a-f]{7}\b.*machine", first, re.DOTALL), (
            section.splitlines()[0]
        )
