"""Fixtures shared by the end-to-end test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import harness


@pytest.fixture(scope="module", params=["false", "true"], ids=["twisted", "spliced"])
def relay_paths(request: pytest.FixtureRequest) -> Iterator[str]:
    """
    Runs a module's tests twice, relayed by Twisted and then spliced, by
    setting the C{splice} field of every route L{harness.tcp_route} writes.
    """
    harness.ROUTE_DEFAULTS["splice"] = request.param
    yield request.param
    harness.ROUTE_DEFAULTS["splice"] = "false"
