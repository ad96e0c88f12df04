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
