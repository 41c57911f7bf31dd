"""scikit-learn digits as captioned images: stratified splits, disjoint templates, rendering."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from duomo.data.digits import (
    CLASSES,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    DigitsDataset,
    split_indices,
)
from duomo.errors import InputError


@pytest.fixture(scope="module", name="sklearn_datasets")
def sklearn_datasets_module():
    """`sklearn.datasets`, where DigitsDataset reads the scans from; skips the test without scikit-learn."""
    return pytest.importorskip("sklearn.datasets")


def test_splits_partition_the_scans_80_20_per_digit(sklearn_datasets) -> None:
    labels = sklearn_datasets.load_digits().target
    train, test = split_indices("train", 0), split_indices("test", 0)
    assert len(train) + len(test) == len(labels) == 1797
    assert not set(train) & set(test)
    assert len(test) == 359
    for digit in range(10):
        n = int((labels == digit).sum())
        assert abs(int((labels[test] == digit).sum()) - 0.2 * n) <= 0.5 + 1e-9, digit
    assert np.array_equal(split_indices("test", 0), test)  # deterministic
    assert not np.array_equal(split_indices("test", 1), test)  # the seed picks another split
    assert len(split_indices("all")) == 1797
    assert len(DigitsDataset("train")) == len(train) and len(DigitsDataset("test")) == len(test)


def test_samples_are_rgb_with_real_labels(sklearn_datasets) -> None:
    labels = sklearn_datasets.load_digits().target
    ds = DigitsDataset("train", image_size=48)
    assert (
        ds.classes
        == CLASSES
        == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
    for i in (0, 100, len(ds) - 1):
        s = ds[i]
        assert (
            isinstance(s["image"], Image.Image) and s["image"].mode == "RGB" and s["image"].size == (48, 48)
        )
        source = int(s["key"].split("-")[1])
        assert s["label"] == labels[source] and s["key"] == f"digits-{source:04d}"
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.usefixtures("sklearn_datasets")  # DigitsDataset loads the scans
def test_images_are_dark_ink_on_light_paper_and_smooth() -> None:
    img = np.asarray(DigitsDataset("train")[0]["image"], dtype=np.int32)
    assert (img[0, 0] == 255).all() and img.min() < 60  # white margin, dark ink
    assert len(np.unique(img[..., 0])) > 20  # upsampled smoothly, not 8x8 blocks
    light = np.asarray(DigitsDataset("train", invert=False)[0]["image"], dtype=np.int32)
    assert (light[0, 0] == 0).all()
    coloured = [np.asarray(DigitsDataset("train", coloured=True)[i]["image"]) for i in range(5)]
    corners = {tuple(c[0, 0]) for c in coloured}
    assert len(corners) == 5 and all(min(c) >= 170 for c in corners)


@pytest.mark.usefixtures("sklearn_datasets")  # DigitsDataset loads the scans
def test_train_and_eval_templates_are_disjoint() -> None:
    def frame(template: str) -> str:
        return re.sub(r"\{(digit)?\}", "X", template).strip(" .").lower()

    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    assert not {frame(t) for t in TRAIN_TEMPLATES} & {frame(t) for t in EVAL_TEMPLATES}
    assert all("{}" in t and "{digit}" not in t for t in EVAL_TEMPLATES)  # usable by the zero-shot classifier
    # the same frame as captions: no eval prompt appears in any training caption
    ds = DigitsDataset("train")
    captions = {ds.caption(i) for i in range(len(ds))}
    assert ds.caption(7) == ds[7]["text"]
    eval_prompts = {t.format(c) for t in EVAL_TEMPLATES for c in CLASSES}
    assert not captions & eval_prompts
    assert len({frame(t) for t in TRAIN_TEMPLATES}) == len(TRAIN_TEMPLATES)


@pytest.mark.usefixtures("sklearn_datasets")  # DigitsDataset loads the scans
def test_captions_name_the_digit_and_come_from_the_split_templates() -> None:
    for split, templates in (("train", TRAIN_TEMPLATES), ("test", EVAL_TEMPLATES)):
        ds = DigitsDataset(split)
        filled = {t.format(c, digit=str(i)) for t in templates for i, c in enumerate(CLASSES)}
        used = set()
        for i in range(0, len(ds), 7):
            s = ds[i]
            assert s["text"] in filled
            assert CLASSES[s["label"]] in s["text"] or str(s["label"]) in s["text"]
            used.add(s["text"])
        assert len(used) > 20


@pytest.mark.usefixtures("sklearn_datasets")  # DigitsDataset loads the scans
def test_deterministic_and_custom_templates() -> None:
    a, b = DigitsDataset("train", seed=3), DigitsDataset("train", seed=3)
    assert a[5]["text"] == b[5]["text"] and a[5]["image"].tobytes() == b[5]["image"].tobytes()
    ds = DigitsDataset("test", templates=["digit {digit} ({})"], size=10)
    assert len(ds) == 10 and ds[0]["text"] == f"digit {ds[0]['label']} ({CLASSES[ds[0]['label']]})"
    with pytest.raises(InputError, match="placeholder"):
        DigitsDataset(templates=["no placeholder"])
    with pytest.raises(InputError, match="split"):
        DigitsDataset("val")
