"""ImageTransform gives exactly OpenCLIP's tensors; preprocess_images batches any image source."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from duomo.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, image_transform, preprocess_images
from duomo.errors import ImageError, InputError


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random-noise RGB image converted to mode."""
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def rgba_with_holes(w: int, h: int) -> Image.Image:
    """Noise with a random alpha channel: the resize premultiplies alpha, so the order of ops matters."""
    img = noise(w, h, "RGBA", seed=1)
    img.putalpha(Image.fromarray(np.random.default_rng(2).integers(0, 256, (h, w), dtype=np.uint8)))
    return img


PARITY_IMAGES = {
    "odd_300x217": lambda: noise(300, 217),
    "landscape_640x480": lambda: noise(640, 480, seed=3),
    "portrait_480x640": lambda: noise(480, 640, seed=4),
    "tiny_10x10": lambda: noise(10, 10, seed=5),
    "exact_224": lambda: noise(224, 224, seed=6),
    "rgba": lambda: rgba_with_holes(333, 250),
    "gray_L": lambda: noise(250, 301, "L"),
    "palette_P": lambda: noise(257, 199, "P"),
    "cmyk": lambda: noise(230, 260, "CMYK"),
    "one_bit": lambda: noise(229, 231, "1"),
}


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("name", sorted(PARITY_IMAGES))
def test_eval_transform_matches_openclip_exactly(name: str, size: int) -> None:
    open_clip = pytest.importorskip("open_clip")
    img = PARITY_IMAGES[name]()
    want = open_clip.image_transform(size, is_train=False)(img)
    got = image_transform(size)(img)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    assert torch.equal(got, want)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_modes_and_interpolations_match_openclip(resize_mode: str, interpolation: str) -> None:
    open_clip = pytest.importorskip("open_clip")
    for img in (noise(300, 217), noise(90, 400, seed=7)):
        want = open_clip.image_transform(
            224, is_train=False, resize_mode=resize_mode, interpolation=interpolation
        )(img)
        got = ImageTransform(224, interpolation=interpolation, resize_mode=resize_mode)(img)
        assert torch.equal(got, want)


def test_custom_mean_std_match_openclip() -> None:
    open_clip = pytest.importorskip("open_clip")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    img = noise(256, 200)
    want = open_clip.image_transform(224, is_train=False, mean=mean, std=std)(img)
    assert torch.equal(image_transform(224, mean=mean, std=std)(img), want)


def test_train_transform_matches_openclip_with_the_same_seed() -> None:
    open_clip = pytest.importorskip("open_clip")
    ref, ours = open_clip.image_transform(224, is_train=True), image_transform(224, train=True)
    img = noise(400, 300)
    for seed in range(5):
        torch.manual_seed(seed)
        want = ref(img)
        torch.manual_seed(seed)
        assert torch.equal(ours(img), want)
    torch.manual_seed(0)
    assert not torch.equal(ours(img), ours(img))  # it is random


def test_constants_are_openais() -> None:
    open_clip = pytest.importorskip("open_clip")
    assert tuple(open_clip.OPENAI_DATASET_MEAN) == CLIP_MEAN
    assert tuple(open_clip.OPENAI_DATASET_STD) == CLIP_STD


def test_output_range_without_openclip() -> None:
    white = image_transform(224)(Image.new("RGB", (50, 80), (255, 255, 255)))
    want = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    torch.testing.assert_close(white[:, 0, 0], want, rtol=0, atol=1e-6)
    squashed = ImageTransform(64, resize_mode="squash")(noise(200, 30))
    assert squashed.shape == (3, 64, 64)


def test_sixteen_bit_input_is_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    x = image_transform(32)(Image.fromarray(ramp))
    lo = (0 - CLIP_MEAN[0]) / CLIP_STD[0]
    hi = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert x[0].min() < lo + 0.2 and x[0].max() > hi - 0.2  # PIL's convert("RGB") would give mostly white


def test_preprocess_images_batches_every_source_kind(tmp_path: Path) -> None:
    img = noise(120, 90)
    path = tmp_path / "a.png"
    img.save(path)
    data = path.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    t = image_transform(64)
    batch = preprocess_images([str(path), path, data, io.BytesIO(data), url, img], t)
    assert batch.shape == (6, 3, 64, 64)
    for row in batch:
        assert torch.equal(row, t(img))


def test_preprocess_images_errors(tmp_path: Path) -> None:
    t = image_transform(32)
    with pytest.raises(ImageError, match="does not exist"):
        preprocess_images([noise(40, 40), tmp_path / "missing.jpg"], t)
    with pytest.raises(InputError):
        preprocess_images([], t)
    with pytest.raises(InputError):
        preprocess_images("one.jpg", t)  # type: ignore[arg-type]


def test_bad_settings_and_inputs() -> None:
    for kwargs in ({"resize_mode": "longest_side"}, {"interpolation": "lanczos9"}, {"image_size": 0}):
        with pytest.raises(InputError):
            ImageTransform(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        ImageTransform(mean=(0.5,))
    with pytest.raises(InputError, match="PIL image"):
        image_transform()("a.jpg")  # type: ignore[arg-type]
    assert "224" in repr(image_transform()) and "train" in repr(image_transform(train=True))
