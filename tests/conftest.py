"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.burners import Burners
from tests.cgroup_helpers import TestTree, available


@pytest.fixture(params=["v2", "v1"])
def tree(request: pytest.FixtureRequest) -> Iterator[TestTree]:
    """A private subtree of one real hierarchy, with `tree.burners`; both are removed after
    the test, also when it fails."""
    why = available(request.param)
    if why:
        pytest.skip(why)
    made = TestTree(request.param)
    burners = Burners()
    made.burners = burners  # type: ignore[attr-defined]
    try:
        yield made
    finally:
        burners.stop_all()
        made.cleanup()
