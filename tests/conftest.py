"""Shared fixtures."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.burners import Burners
from tests.cgroup_helpers import TestTree, available
from tests.deb_helpers import Deb, build, cannot_build
from tests.fakes.nvml import build_fake
from tests.unprivileged import install_for_others, interpreter_for_others


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


@pytest.fixture(scope="session")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in libnvidia-ml.so.1, compiled once per run."""
    return build_fake(tmp_path_factory.mktemp("nvml-fake"))


@pytest.fixture(scope="session")
def fake_lib_no_v3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same library without the _v3 process queries, as older drivers ship it."""
    return build_fake(tmp_path_factory.mktemp("nvml-fake-nov3"), no_v3=True)


@pytest.fixture(scope="session")
def carbond_deb(tmp_path_factory: pytest.TempPathFactory) -> Deb:
    """`make deb` once per run (scripts/build-deb.sh; the wheels from PyPI)."""
    why = cannot_build()
    if why:
        pytest.skip(why)
    return build(tmp_path_factory.mktemp("deb"), tmp_path_factory.mktemp("deb-work"))


@pytest.fixture(scope="session")
def carbond_deb_newer(tmp_path_factory: pytest.TempPathFactory, carbond_deb: Deb) -> Deb:
    """A newer build of the same code (`make deb VERSION_SUFFIX=+test2`), to upgrade to."""
    return build(tmp_path_factory.mktemp("deb-newer"), tmp_path_factory.mktemp("deb-work"),
                 suffix="+test2")


@pytest.fixture(scope="session")
def for_others() -> Iterator[tuple[str, Path]]:
    """(python, site directory) with which another user (nobody) runs `python -m carbond`
    with PYTHONPATH=site, also when the clone is in a 0700 directory; removed afterwards."""
    python = interpreter_for_others()
    if python is None:
        pytest.skip("no Python another user can run (none outside 0700 directories)")
    site = install_for_others()
    try:
        yield python, site
    finally:
        shutil.rmtree(site, ignore_errors=True)
