"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one intra-op thread (modules opt in with ``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): tiny models gain nothing from intra-op threads, and lose a lot to them on a busy 2-core
    machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
