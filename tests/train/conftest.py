"""Training tests: one intra-op thread each, as CI runs two pytest workers on two cores."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test with one torch thread (oversubscribed cores make small matmuls 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
