"""Fixtures for the index tests: a tiny seeded model and a pipeline wrapper that counts model calls."""

from __future__ import annotations

import pytest
import torch
from index_helpers import CountingPipeline

from duomo import Pipeline
from duomo.models import create_model


@pytest.fixture(scope="session")
def micro() -> Pipeline:
    """ViT-micro with fixed random weights (deterministic across runs)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model("ViT-micro")
    return Pipeline(model, name="ViT-micro")


@pytest.fixture
def pipe(micro: Pipeline) -> CountingPipeline:
    return CountingPipeline(micro)
