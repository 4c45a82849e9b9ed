"""Fixtures for the VMU tests; the fakes live in fakes.py."""

from __future__ import annotations

from typing import Iterator

import pytest

from djinn.drivers.vmu import VMU
from tests.drivers.vmu.fakes import make_vmu


@pytest.fixture
def small_vmu() -> Iterator[VMU]:
    """A CPU VMU with 4 MiB Data and host segments, closed after the test."""
    vmu = make_vmu()
    try:
        yield vmu
    finally:
        vmu.close()
