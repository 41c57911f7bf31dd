"""The shapes world: determinism, the held-out split, captions, QA answers and pixels that match the scene."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from PIL import Image

from duomo.data import shapes
from duomo.data.shapes import (
    CAPTION_STYLES,
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapesDataset,
    class_names,
    heldout_pairs,
    render_scene,
)
from duomo.errors import InputError


def test_samples_follow_the_convention() -> None:
    ds = ShapesDataset(size=5, image_size=48)
    s = ds[3]
    assert isinstance(s["image"], Image.Image) and s["image"].mode == "RGB" and s["image"].size == (48, 48)
    assert isinstance(s["text"], str) and s["text"]
    assert (
        ds.classes[s["label"]] == s["label_name"] == f"{s['objects'][0]['colour']} {s['objects'][0]['shape']}"
    )
    assert s["key"] == "shapes-train-0-00000003"
    assert all(isinstance(q, str) and isinstance(a, str) for q, a in s["qa"])
    assert len(ds) == 5 and ds[-1]["key"] == ds[4]["key"]
    with pytest.raises(IndexError):
        ds[5]
    assert [s["key"] for s in ds] == [f"shapes-train-0-{i:08d}" for i in range(5)]  # iteration stops


def test_deterministic_by_seed_split_and_index() -> None:
    a, b = ShapesDataset(size=20, seed=7), ShapesDataset(size=20, seed=7)
    for i in (0, 5, 19):
        assert a[i]["text"] == b[i]["text"] and a[i]["qa"] == b[i]["qa"]
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes()
    assert [a[i]["text"] for i in range(20)] != [ShapesDataset(size=20, seed=8)[i]["text"] for i in range(20)]
    # val: the same seed and index, other samples
    val = ShapesDataset("val", size=20, seed=7)
    assert [a[i]["image"].tobytes() for i in range(20)] != [val[i]["image"].tobytes() for i in range(20)]
    # sample i does not depend on the dataset size
    assert ShapesDataset(size=100, seed=7)[5]["text"] == a[5]["text"]


def test_heldout_pairs_are_a_fifth_and_leave_every_attribute_in_train() -> None:
    held = heldout_pairs(0)
    assert len(held) == round(0.2 * len(COLOURS) * len(SHAPES))
    assert heldout_pairs(0) == held and heldout_pairs(1) != held
    train = {tuple(name.split()) for name in class_names("train")}
    assert train.isdisjoint(held) and len(train) + len(held) == len(COLOURS) * len(SHAPES)
    assert {c for c, _ in train} == set(COLOURS) and {s for _, s in train} == set(SHAPES)
    assert {tuple(n.split()) for n in class_names("heldout")} == set(held)
    assert class_names("val") == class_names("train")


@pytest.mark.parametrize("split", ["train", "val"])
def test_heldout_combinations_never_appear_in_train_or_val(split: str) -> None:
    held = heldout_pairs(0)
    held_names = [f"{c} {s}" for c, s in held]
    ds = ShapesDataset(split, size=3000, max_objects=5)
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert all((o.colour, o.shape) not in held for o in scene.objects), i
        text = " ".join([scene.metadata["caption"]] + [q + " " + a for q, a in scene.metadata["qa"]])
        assert not any(name in text for name in held_names), (i, text)


def test_heldout_split_draws_its_main_object_from_heldout_pairs() -> None:
    ds = ShapesDataset("heldout", size=500, max_objects=3)
    mains = {(ds.scene(i).main.colour, ds.scene(i).main.shape) for i in range(len(ds))}
    assert mains == set(heldout_pairs(0))
    assert ds.classes == class_names("heldout")
    assert ds[0]["label"] == ds.classes.index(ds.scene(0).main.name)


@pytest.mark.parametrize("style", [*CAPTION_STYLES, "mixed"])
def test_every_caption_names_the_main_colour_and_shape(style: str) -> None:
    ds = ShapesDataset(size=400, max_objects=4, caption_style=style)
    for i in range(len(ds)):
        scene = ds.scene(i)
        caption = scene.metadata["caption"]
        assert f"{scene.main.colour} {scene.main.shape}" in caption, caption
        assert not re.search(r"\ba [aeiou]", caption), caption  # "an orange", never "a orange"


def test_caption_styles_look_as_documented() -> None:
    def caption(style: str, max_objects: int = 1) -> str:
        return (
            ShapesDataset(size=1, caption_style=style, max_objects=max_objects).scene(0).metadata["caption"]
        )

    assert re.fullmatch(r"an? \w+ \w+", caption("short"))
    assert re.fullmatch(r"an? (small|large) \w+ \w+", caption("size"))
    assert re.fullmatch(r"\w+ \w+\.", caption("terse"))
    assert caption("scene").startswith("there is ")
    assert re.match(r"(one|two|three) shapes?: ", caption("count", 3))
    mixed = {ShapesDataset(size=200).scene(i).metadata["caption"].split()[0] for i in range(200)}
    assert len(mixed) >= 5  # mixed really mixes the styles


def _answers(scene: shapes.Scene) -> dict[str, str]:
    return dict(scene.metadata["qa"])


def test_qa_answers_match_the_scene() -> None:
    ds = ShapesDataset(size=600, max_objects=5)
    kinds: set[str] = set()
    for i in range(len(ds)):
        scene = ds.scene(i)
        objs, main = scene.objects, scene.main
        assert len({o.position for o in objs}) == len(objs)  # one object per slot: positions are unambiguous
        assert len({o.name for o in objs}) == len(objs)
        for q, a in scene.metadata["qa"]:
            if q == "how many shapes are there?":
                kinds.add("count")
                assert a == str(len(objs))
            elif m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
                kinds.add("count colour")
                assert a == str(sum(o.colour == m[1] for o in objs))
            elif m := re.fullmatch(r"what color is the (\w+)(?: (?:on|at|in) the (\w+))?\?", q):
                kinds.add("colour")
                (obj,) = [o for o in objs if o.shape == m[1] and (m[2] is None or o.position == m[2])]
                assert a == obj.colour
            elif m := re.fullmatch(r"what shape is (?:on|at|in) the (\w+)\?", q):
                kinds.add("shape")
                assert a == next(o.shape for o in objs if o.position == m[1])
            elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", q):
                kinds.add("position")
                assert a == next(o.position for o in objs if (o.colour, o.shape) == (m[1], m[2]))
            elif m := re.fullmatch(r"is the (\w+) (\w+) large or small\?", q):
                kinds.add("size")
                assert a == next(o.size for o in objs if (o.colour, o.shape) == (m[1], m[2]))
            elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
                kinds.add("exists " + a)
                assert a == ("yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no")
            else:
                raise AssertionError(f"unexpected question {q!r}")
        assert _answers(scene)[f"where is the {main.name}?"] == main.position
    assert kinds == {
        "count",
        "count colour",
        "colour",
        "shape",
        "position",
        "size",
        "exists yes",
        "exists no",
    }


def test_objects_never_overlap_and_stay_inside_the_image() -> None:
    ds = ShapesDataset(size=1500, max_objects=5)
    sizes = set()
    for i in range(len(ds)):
        objs = ds.scene(i).objects
        for o in objs:
            sizes.add(o.size)
            assert min(o.x, o.y) - o.radius >= -0.01 and max(o.x, o.y) + o.radius <= 1.01
            assert (o.radius >= 0.15) == (o.size == "large")
        for j, a in enumerate(objs):
            for b in objs[j + 1 :]:
                assert math.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius, i
    assert sizes == {"small", "large"}
    assert {len(ds.scene(i).objects) for i in range(200)} == {1, 2, 3, 4, 5}


def test_pixels_show_each_object_in_its_colour_at_its_place() -> None:
    ds = ShapesDataset(size=300, image_size=64, max_objects=3)
    for i in range(len(ds)):
        scene = ds.scene(i)
        pixels = np.asarray(ds[i]["image"], dtype=np.int32)
        for o in scene.objects:
            y, x = int(o.y * 64), int(o.x * 64)
            assert np.abs(pixels[y, x] - np.array(o.rgb)).max() <= 2, (i, o)
        # the named colour is the nearest palette colour of each object's pixels
        for o in scene.objects:
            y, x = int(o.y * 64), int(o.x * 64)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - pixels[y, x]).sum())
            assert nearest == o.colour


def test_large_objects_cover_more_pixels_than_small_ones() -> None:
    ds = ShapesDataset(size=400, image_size=64, caption_style="size")
    area = {"small": [], "large": []}
    for i in range(len(ds)):
        scene = ds.scene(i)
        solid = shapes.Scene(scene.objects, "solid", ((0, 0, 0), (0, 0, 0)))
        pixels = np.asarray(render_scene(solid, 64))
        area[scene.main.size].append(int((pixels.sum(-1) > 0).sum()))
    assert max(area["small"]) < np.median(area["large"])


def test_every_shape_renders_distinctly() -> None:
    masks = {}
    for shape in SHAPES:
        obj = shapes.ShapeObject(shape, "red", "large", "center", 0.5, 0.5, 0.17, (255, 0, 0))
        img = render_scene(shapes.Scene((obj,), "solid", ((0, 0, 0), (0, 0, 0))), 64)
        masks[shape] = np.asarray(img)[..., 0] > 127
        assert 60 < masks[shape].sum() < 0.2 * 64 * 64, shape
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 40, (a, b)


def test_backgrounds_vary_and_image_size_is_free() -> None:
    ds = ShapesDataset(size=60, image_size=32)
    assert {ds.scene(i).background for i in range(60)} == {"solid", "gradient", "noise"}
    big = ShapesDataset(size=2, image_size=224)[1]["image"]
    assert big.size == (224, 224)
    assert {tuple(p) for p in POSITIONS} and len(POSITIONS) == 5


def test_bad_arguments_raise_input_errors() -> None:
    with pytest.raises(InputError, match="split"):
        ShapesDataset("test")
    with pytest.raises(InputError, match="max_objects"):
        ShapesDataset(max_objects=6)
    with pytest.raises(InputError, match="caption style"):
        ShapesDataset(caption_style="poetic")
    with pytest.raises(InputError, match="split"):
        class_names("nope")


def test_demo_samples_have_distinct_seen_labels() -> None:
    samples = shapes.demo_samples(32, n=6)
    names = [s["label_name"] for s in samples]
    assert len(set(names)) == 6 and set(names) <= set(class_names("val"))
    assert all(s["image"].size == (32, 32) and s["text"].endswith(s["label_name"]) for s in samples)


def test_object_framing_draws_one_large_centred_object_named_by_colour_and_shape() -> None:
    ds = ShapesDataset("train", size=40, image_size=32, max_objects=3, framing="object")
    scene_ds = ShapesDataset("train", size=40, image_size=32, max_objects=3)
    for i in range(40):
        scene, original = ds.scene(i), scene_ds.scene(i)
        assert len(scene.objects) == 1 and scene.main.shape == original.main.shape
        assert scene.main.colour == original.main.colour  # the same world, only framed closer
        assert abs(scene.main.x - 0.5) <= 0.02 and abs(scene.main.y - 0.5) <= 0.02
        assert 0.3 <= scene.main.radius <= 0.4
        caption = scene.metadata["caption"]
        assert scene.main.colour in caption and scene.main.shape in caption
        assert not any(word in caption for word in ("left", "right", "top", "bottom", "small", "shapes:"))
    held = ShapesDataset("heldout", size=20, framing="object")
    assert all((held.scene(i).main.colour, held.scene(i).main.shape) in heldout_pairs() for i in range(20))
    with pytest.raises(InputError, match="unknown framing 'zoom'"):
        ShapesDataset(framing="zoom")


def test_shapes_objects_is_a_training_data_name() -> None:
    from duomo.train.run import build_dataset

    data = build_dataset("shapes-objects", 32, 10)
    assert data.framing == "object" and data[0]["image"].size == (32, 32)
