"""Helpers for the index tests: a pipeline wrapper that counts model calls, and image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from duomo import Pipeline


class CountingPipeline:
    """A Pipeline stand-in that counts the images going through the model (and can pretend another name)."""

    def __init__(self, pipe: Pipeline, name: str | None = None) -> None:
        self._pipe = pipe
        self.name = name or pipe.name
        self.embedded = 0
        self.calls = 0

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._pipe, attr)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.embedded += len(pixels)
        return self._pipe.encode_pixels(pixels)


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    """A random-noise image at path, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n distinct images in root and a subfolder, mixed formats."""
    suffixes = [".png", ".jpg", ".webp", ".bmp", ".gif", ".tiff"]
    return [
        write_image(
            root / ("sub" if i % 3 == 0 else "") / f"img{i:03d}{suffixes[i % len(suffixes)]}", seed * 1000 + i
        )
        for i in range(n)
    ]


def coloured_squares(root: Path, n: int = 23) -> Path:
    """n PNG squares of random colours in root/a and root/b, plus one corrupt root/a/broken.png."""
    from tests.serve.helpers import png_bytes

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:03d}.png").write_bytes(png_bytes(tuple(int(x) for x in rng.integers(0, 255, 3)), 48 + i))
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return root
