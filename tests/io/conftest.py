"""Shared inputs and a cache of duomo models for the checkpoint interop tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from duomo.io import load_into
from duomo.models import CLIP, CLIPConfig, create_model

# Captions of different lengths, so that end-of-text pooling picks different positions.
CAPTIONS = [
    "a photo of a cat",
    "dog",
    "a long caption about a small red boat drifting slowly across a calm lake at sunset, seen from a hill",
    "",
]
TOLERANCE = 1e-5  # max abs difference of raw projected fp32 embeddings


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    """Real CLIP BPE tokens of CAPTIONS, [4, 77]."""
    open_clip = pytest.importorskip("open_clip")
    return open_clip.tokenize(CAPTIONS)


@pytest.fixture(scope="session")
def images() -> Callable[[int], torch.Tensor]:
    """Random pixels [2, 3, size, size], the same for every caller asking for that size."""

    def make(size: int) -> torch.Tensor:
        return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))

    return make


@pytest.fixture(scope="session")
def duomo_model() -> Callable[[CLIPConfig, dict], CLIP]:
    """A duomo model for a config, built once per config and reloaded with each state dict."""
    cache: dict[str, CLIP] = {}

    def load(cfg: CLIPConfig, sd: dict) -> CLIP:
        key = repr(cfg)
        if key not in cache:
            cache.clear()  # ViT-B models are big: keep only the last one
            cache[key] = create_model(cfg).eval()
        return load_into(cache[key], sd)

    return load


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, after checking the shapes agree."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


Embeddings = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def embed(
    encode_image: Callable, encode_text: Callable, pixels: torch.Tensor, toks: torch.Tensor
) -> Embeddings:
    """Raw projected image and text embeddings of one encoder pair."""
    return encode_image(pixels), encode_text(toks)


@pytest.fixture(name="embed", scope="session")
def embed_fixture() -> Callable[..., Embeddings]:
    """`embed` for tests."""
    return embed


@pytest.fixture(scope="session")
def compare() -> Callable[..., dict[str, float]]:
    """Check a reference encoder pair against duomo's embeddings (a model, or its precomputed outputs)."""

    def run(want: CLIP | Embeddings, encode_image: Callable, encode_text: Callable, pixels, toks) -> dict:
        if isinstance(want, CLIP):
            want = embed(want.encode_image, want.encode_text, pixels, toks)
        got = embed(encode_image, encode_text, pixels, toks)
        diffs = {"image": max_diff(want[0], got[0]), "text": max_diff(want[1], got[1])}
        print(f"max abs diff: {diffs}")
        assert diffs["image"] <= TOLERANCE and diffs["text"] <= TOLERANCE, diffs
        return diffs

    return run
