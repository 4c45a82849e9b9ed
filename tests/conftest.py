"""Shared fixtures: a live daemon, a connected client, GPU skipping, asyncio+uvloop for async tests."""

from __future__ import annotations

import asyncio
from typing import Iterator

import pytest

from tests.daemon import LiveDaemon, daemon_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item):  # pytest-asyncio >= 1.4
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def djinnd() -> Iterator[LiveDaemon]:
    """One live daemon (demo model, CPU, grace 0) shared by the whole test session."""
    d = LiveDaemon(daemon_config()).start()
    yield d
    d.stop()


@pytest.fixture
def fresh_djinnd(request: pytest.FixtureRequest) -> Iterator[LiveDaemon]:
    """A daemon of the test's own; parametrize overrides with `@pytest.mark.daemon(policy=...)`."""
    marker = request.node.get_closest_marker("daemon")
    overrides = dict(marker.kwargs) if marker else {}
    d = LiveDaemon(daemon_config(**overrides)).start()
    yield d
    d.stop()


@pytest.fixture
def kernel(djinnd: LiveDaemon):
    import djinn

    with djinn.connect(djinnd.path) as k:
        yield k
