"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) as captioned RGB images.

The scans get a one-pixel margin, are upsampled smoothly to `image_size`, drawn dark-on-light (optionally with
random pale paper and dark ink colours), and captioned from templates. Training and evaluation templates are
disjoint, so a zero-shot evaluation with `EVAL_TEMPLATES` uses wordings the model never saw in training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from duomo.errors import InputError

CLASSES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS: tuple[str, ...] = ("train", "test", "all")
TEST_FRACTION = 0.2

# "{}" is the number word ("seven"), "{digit}" the numeral ("7"). Evaluation templates use only "{}", the
# placeholder duomo's zero-shot classifier fills with a class name.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of the digit {}.",
    "handwritten {digit}",
    "the number {}",
    "a handwritten {}.",
    "a scan of the number {}.",
    "the digit {digit}, written by hand",
    "{}",
    "a small grainy image of a handwritten {}",
    "someone wrote the number {}.",
    "a blurry {digit}.",
)
EVAL_TEMPLATES: tuple[str, ...] = (
    "a picture of a handwritten digit {}.",
    "an image of the numeral {}.",
    "a drawing of the digit {}.",
    "a low resolution {} written by hand.",
)


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """The raw scans (float32 [1797, 8, 8], ink 0..1) and their labels (int64 [1797])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def split_indices(split: str, seed: int = 0, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Indices into the 1,797 scans of a split: stratified, the same 20% of each digit is "test" per seed."""
    if split not in SPLITS:
        raise InputError(f"unknown digits split {split!r}; choose one of {list(SPLITS)}")
    _, labels = _load()
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    test = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        test.append(rng.permutation(members)[: round(test_fraction * len(members))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def render_digit(ink: np.ndarray, image_size: int, paper: Sequence[int], pen: Sequence[int]) -> Image.Image:
    """An 8x8 ink map (0..1) as an RGB image: a 1-pixel margin, bicubic upsampling, pen colour over paper."""
    scan = Image.fromarray(np.pad(ink, 1), mode="F").resize((image_size, image_size), Image.BICUBIC)
    alpha = np.clip(np.asarray(scan), 0.0, 1.0)[..., None]  # bicubic overshoots a little at stroke edges
    paper_, pen_ = np.asarray(paper, np.float32), np.asarray(pen, np.float32)
    return Image.fromarray((paper_ + (pen_ - paper_) * alpha + 0.5).astype(np.uint8), "RGB")


class DigitsDataset(torch.utils.data.Dataset):
    """Map-style scikit-learn digits: {"image", "text", "label", "key"} samples, classes "zero".."nine"."""

    classes: list[str] = CLASSES

    def __init__(
        self,
        split: str = "train",
        image_size: int = 64,
        seed: int = 0,
        templates: Sequence[str] | None = None,
        coloured: bool = False,
        invert: bool = True,
        size: int | None = None,
    ) -> None:
        """Select a split; templates default to TRAIN_TEMPLATES ("train", "all") or EVAL_TEMPLATES (test)."""
        if image_size < 8:
            raise InputError(f"image_size must be at least 8 (the scans are 8x8), got {image_size}")
        self.split, self.image_size, self.seed = split, int(image_size), int(seed)
        self.indices = split_indices(split, seed)
        if size is not None:
            if size < 0:
                raise InputError(f"size must be >= 0, got {size}")
            self.indices = self.indices[:size]
        if templates is None:
            templates = EVAL_TEMPLATES if split == "test" else TRAIN_TEMPLATES
        self.templates = tuple(templates)
        if not self.templates:
            raise InputError("templates must hold at least one caption template")
        bad = [t for t in self.templates if "{}" not in t and "{digit}" not in t]
        if bad:
            raise InputError(
                f"caption template {bad[0]!r} has no '{{}}' (number word) or '{{digit}}' placeholder"
            )
        self.coloured, self.invert = coloured, invert

    def __len__(self) -> int:
        """Number of samples in the split."""
        return len(self.indices)

    def _rng(self, source: int) -> random.Random:
        return random.Random(f"duomo-digits/{self.seed}/{self.split}/{source}")

    def caption(self, index: int) -> str:
        """The caption of one sample, without rendering its image."""
        source = int(self.indices[index])
        label = int(_load()[1][source])
        return self._rng(source).choice(self.templates).format(CLASSES[label], digit=str(label))

    def texts(self) -> list[str]:
        """Every sample's caption, without rendering images."""
        return [self.caption(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        """{"image", "text", "label", "key"} of one sample; caption and colours are fixed by (seed, index)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        source = int(self.indices[index])
        images, labels = _load()
        label = int(labels[source])
        rng = self._rng(source)
        text = rng.choice(self.templates).format(CLASSES[label], digit=str(label))
        paper, pen = (255, 255, 255), (0, 0, 0)
        if self.coloured:  # pale paper, dark ink: varied, but the digit always contrasts
            paper = tuple(rng.randint(170, 255) for _ in range(3))
            pen = tuple(rng.randint(0, 90) for _ in range(3))
        if not self.invert:
            paper, pen = pen, paper
        return {
            "image": render_digit(images[source], self.image_size, paper, pen),
            "text": text,
            "label": label,
            "key": f"digits-{source:04d}",
        }

    def __repr__(self) -> str:
        """The settings, one line."""
        size = f"image_size={self.image_size}"
        return f"DigitsDataset(split={self.split!r}, n={len(self)}, {size}, seed={self.seed})"
