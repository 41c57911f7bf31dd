"""Shared fixtures for the server tests: a tiny model, apps, and an index of generated images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import duomo
from duomo.serve import ServeSettings, create_app
from tests.serve.helpers import png_bytes, write_images


@pytest.fixture(scope="session")
def pipeline() -> duomo.Pipeline:
    """The micro model with fixed random weights (fast; meaningless but deterministic embeddings)."""
    torch.manual_seed(0)
    return duomo.load("ViT-micro")


@pytest.fixture
def make_client(pipeline: duomo.Pipeline) -> Iterator[Callable[..., TestClient]]:
    """Factory: a started TestClient for an app with the given settings (no index unless asked for)."""
    clients: list[TestClient] = []

    def make(**kwargs: object) -> TestClient:
        kwargs.setdefault("use_index", False)
        client = TestClient(create_app(ServeSettings(**kwargs), pipeline=pipeline))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """A client for an app without index or API keys."""
    return make_client()


@pytest.fixture(scope="session")
def image_index(tmp_path_factory: pytest.TempPathFactory, pipeline: duomo.Pipeline) -> tuple[Path, Path]:
    """(index_dir, images_root): an index of generated images built with the test model."""
    from duomo.index import ImageIndex

    base = tmp_path_factory.mktemp("served")
    root = base / "photos"
    write_images(root)
    (root / "sub").mkdir()
    (root / "sub" / "nested.png").write_bytes(png_bytes((120, 20, 160), 40))
    index_dir = base / "index"
    idx = ImageIndex.open(index_dir, pipeline)
    idx.update([root], progress=False)
    close = getattr(idx, "close", None)
    if callable(close):
        close()
    return index_dir, root


@pytest.fixture(scope="session")
def task_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(vqa_dir, caption_dir): micro BEiT-3 VQA and captioning models with fixed random weights."""
    from duomo.data.shapes import COLOURS, SHAPES
    from duomo.io.beit3_tasks import save_task
    from duomo.models.beit3 import BEiT3ForCaptioning, VQAModel, create_beit3

    base = tmp_path_factory.mktemp("task-models")
    torch.manual_seed(0)
    answers = [*COLOURS, *SHAPES, "0", "1", "2", "yes", "no"]
    vqa_dir = save_task(VQAModel(create_beit3("beit3-micro"), answers), base / "micro-vqa", "vqa")
    caption = BEiT3ForCaptioning(create_beit3("beit3-micro"), 49406, 49407)
    caption_dir = save_task(caption, base / "micro-caption", "caption")
    return vqa_dir, caption_dir
