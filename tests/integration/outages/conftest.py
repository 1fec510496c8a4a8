"""A PostgreSQL of the outage tests' own, which they crash, stop and start."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import TEST_HOME
from tests.support.cluster import Cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Started once per module; each test leaves it running (its own database is made fresh)."""
    private = Cluster(TEST_HOME / f"outage-{uuid.uuid4().hex[:8]}")
    private.start()
    try:
        yield private
    finally:
        private.destroy()
