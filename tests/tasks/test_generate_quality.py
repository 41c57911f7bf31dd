"""Quality measures for generated images: CLIP score, Fréchet distance, the pixel colour check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duomo.data.shapes import COLOURS, ShapesDataset
from duomo.errors import InputError
from duomo.tasks.diffusion.quality import clip_score, dominant_colour, frechet_distance


def test_clip_score_is_torchmetrics_definition() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    # cosines 1, -1 (clipped to 0), 1/sqrt(2): mean of 100 * max(cos, 0)
    assert clip_score(img, txt) == pytest.approx(100 * (1 + 0 + 2**-0.5) / 3)
    with pytest.raises(InputError, match="matching rows"):
        clip_score(img, txt[:2])


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    shifted = a + np.array([2.0, 0.0, 0.0])  # same covariance: the distance is the squared mean shift
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)
    scaled = a * 2  # identity-ish covariance C vs 4C: Tr(C + 4C - 2 * 2C) = Tr(C) ~ 3
    assert frechet_distance(a, scaled) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-3)
    with pytest.raises(InputError):
        frechet_distance(a[:1], a)


def test_dominant_colour_reads_rendered_shapes() -> None:
    data = ShapesDataset("train", size=120, image_size=32)
    right = 0
    for i in range(len(data)):
        sample = data[i]
        pixels = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float() / 255
        right += dominant_colour(pixels, COLOURS) == sample["label_name"].split()[0]
    assert right / len(data) >= 0.95
    grey = torch.full((3, 32, 32), 0.5)
    assert dominant_colour(grey, COLOURS) is None
    with pytest.raises(InputError):
        dominant_colour(grey[0], COLOURS)


def test_reframe_close_ups_shrinks_onto_the_border_colour() -> None:
    from duomo.tasks.diffusion.quality import reframe_close_ups

    image = torch.zeros(1, 3, 32, 32)
    image[:, 0] = 0.2  # a dark red background ...
    image[:, 1, 8:24, 8:24] = 1.0  # ... with a green square in the middle
    out = reframe_close_ups(image, 64, scale=0.5)
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out[0, :, 2, 2], torch.tensor([0.2, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert out[0, 1, 32, 32] > 0.95 and out[0, 1, 20, 20] < 0.2  # the square now spans 16 px of 64
    with pytest.raises(InputError, match=r"expected images \[N, 3, H, W\]"):
        reframe_close_ups(torch.zeros(3, 32, 32), 64)


def test_object_solidity_tells_stars_from_circles() -> None:
    from duomo.tasks.diffusion.quality import object_solidity

    data = ShapesDataset("train", size=120, image_size=32, framing="object")
    seen = {}
    for i in range(len(data)):
        scene = data.scene(i)
        if scene.main.shape in ("star", "circle") and scene.main.shape not in seen:
            image = torch.from_numpy(np.array(data[i]["image"])).permute(2, 0, 1).float() / 255
            seen[scene.main.shape] = object_solidity(image, COLOURS[scene.main.colour])
    assert seen["star"] < 0.7 < 0.9 < seen["circle"]
    assert object_solidity(torch.zeros(3, 8, 8), COLOURS["red"]) == 0.0  # nothing of that colour
    with pytest.raises(InputError, match="expected an image tensor"):
        object_solidity(torch.zeros(8, 8), COLOURS["red"])
