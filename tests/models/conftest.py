"""Fixtures of the real-engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipelines.compute import Compute


@pytest.fixture(scope="module")
def compute() -> Iterator[Compute]:
    """The scheduler's lanes the engines run on, one per test module."""
    c = Compute()
    yield c
    c.close()
