"""The two tiers and the grouping of tests onto xdist workers.

The slow tier (`pytest -m "not slow"` leaves it out) is chosen by location or marker, never by fixture name:
everything under tests/e2e/ (real `mlflow run` launches, servers, Ray clusters), and each test elsewhere marked
`@pytest.mark.slow` with the reason on the line (it starts a server or Ray, or trains repeatedly). The fixtures that
start processes refuse a test outside the slow tier (`require_slow`), so that renaming a fixture cannot move a test
into the fast tier unseen."""

from __future__ import annotations

import pytest


def mark_location(item: pytest.Item) -> None:
    """tests/e2e/ is the slow tier; a module's tests share one worker unless they name a group of their own, so that
    a module-scoped fixture (a store of runs) is built once."""
    if "e2e" in item.path.parts:
        item.add_marker(pytest.mark.slow)
    if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group(item.path.stem))


# The groups that take longest (measured with --durations on 2 cores: the team's server about 7 minutes, Ray about
# 4), longest first. pytest-xdist hands groups to workers in the order they were collected: collected last, as
# their file names put them, they started when the other workers were nearly done and the suite waited for them.
LONGEST_GROUPS = ("team_server", "ray", "search_e2e", "team_serving")


def arrange(items: list[pytest.Item], tell_xdist: bool) -> None:
    """Every item in its tier and group, the longest groups first; with `--dist loadgroup`, xdist told the groups."""
    for item in items:
        mark_location(item)
    longest_groups_first(items)
    if tell_xdist:
        for item in items:
            tell_xdist_the_group(item)


def longest_groups_first(items: list[pytest.Item]) -> None:
    """Reorder `items` (in place, otherwise keeping their order) so that the `LONGEST_GROUPS` are handed out first."""
    def rank(item: pytest.Item) -> int:
        group = item.get_closest_marker("xdist_group").args[0]
        return LONGEST_GROUPS.index(group) if group in LONGEST_GROUPS else len(LONGEST_GROUPS)

    items.sort(key=rank)


def tell_xdist_the_group(item: pytest.Item) -> None:
    """Workaround for pytest-xdist 3.8.0 with pytest 9.2.0 (remove when xdist reads the group from the marker):
    `--dist loadgroup` tells its scheduler an item's group by rewriting `item._nodeid`, which pytest 9 no longer
    reads (the id lives in the private `item._id`); without this, every group is silently spread over the workers.
    This writes the id the way xdist means to (`<nodeid>@<group>`)."""
    from _pytest.nodeid import NodeId

    item._id = NodeId.parse(f"{item.nodeid}@{item.get_closest_marker('xdist_group').args[0]}")


def require_slow(request: pytest.FixtureRequest, what: str) -> None:
    """Fail a test that starts `what` without being in the slow tier."""
    if request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.nodeid} starts {what}: mark it @pytest.mark.slow or move it to tests/e2e/",
                    pytrace=False)
