"""A procedural compositional world: coloured shapes on varied backgrounds, with captions, labels, QA pairs.

Every sample is generated on the fly from (seed, split, index), so a dataset of any size costs no disk and is
bit-for-bit reproducible. A fixed ~20% of the (colour, shape) combinations is held out: those combinations
never appear in the "train" or "val" splits (not as the main object, not as a distractor, not in a question),
only in "heldout", which measures zero-shot compositional generalisation ("a purple heart" was never seen,
but purple things and hearts were).

Geometry is in units of the image side (0..1), so a scene renders identically at any image size.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from duomo.errors import InputError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 130, 15),
    "yellow": (240, 215, 25),
    "green": (35, 160, 55),
    "cyan": (20, 195, 210),
    "blue": (35, 70, 215),
    "purple": (135, 50, 190),
    "pink": (245, 115, 185),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise")
CAPTION_STYLES: tuple[str, ...] = ("short", "size", "position", "full", "scene", "terse", "photo", "count")
SPLITS: tuple[str, ...] = ("train", "val", "heldout")
LANGUAGES: tuple[str, ...] = ("en", "zh", "both")  # the texts' language; "both": per sample, half each
# Zero-shot prompts in the wordings of the captions ("a red star", "red star.", "a photo of a red star."):
# `duomo eval --data shapes` and the benchmarks use these unless given others.
EVAL_TEMPLATES: tuple[str, ...] = ("a {}", "{}.", "a photo of a {}.", "there is a {}", "a picture of a {}.")
HELDOUT_FRACTION = 0.2

# Radii (fraction of the image side) and placement jitter, chosen so objects in different slots never overlap:
# a large object in the center next to a small one on a side leaves a gap of 0.3 - 0.17 - 0.11 = 0.02.
_RADIUS = {"small": (0.09, 0.11), "large": (0.155, 0.17)}
_OBJECT_RADIUS = (0.3, 0.4)  # framing="object": the main object fills most of the frame
OBJECT_CAPTION_STYLES: tuple[str, ...] = ("short", "terse", "photo")  # no position or size in a close-up
FRAMINGS: tuple[str, ...] = ("scene", "object")
_JITTER = 0.02
_GAP = 0.015
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
_PHOTO_TEMPLATES = (
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "a rendering of {}.",
    "a drawing of {}.",
)


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: attributes (what captions and answers say) and geometry (what is drawn)."""

    shape: str
    colour: str
    size: str
    position: str
    x: float  # center, fraction of the image width
    y: float
    radius: float  # the shape fits in a circle of this radius (fraction of the image side)
    rgb: tuple[int, int, int]
    outline: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        """ "colour shape", e.g. "red star": the class name of this object."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image: objects (the first is the main one) and the background."""

    objects: tuple[ShapeObject, ...]
    background: str
    bg_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_angle: float = 0.0
    noise_seed: int = 0
    noise_sigma: float = 0.0
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def main(self) -> ShapeObject:
        """The object that the label and short captions describe."""
        return self.objects[0]


def all_pairs() -> list[tuple[str, str]]:
    """Every (colour, shape) combination, colour-major in the order of COLOURS and SHAPES."""
    return [(c, s) for c in COLOURS for s in SHAPES]


@lru_cache(maxsize=16)
def heldout_pairs(seed: int = 0) -> frozenset[tuple[str, str]]:
    """The (colour, shape) combinations of the "heldout" split: ~20%, at most 2 per colour and per shape."""
    rng = random.Random(f"duomo-shapes-heldout/{seed}")
    pairs = all_pairs()
    want = round(HELDOUT_FRACTION * len(pairs))
    cap = math.ceil(want / min(len(COLOURS), len(SHAPES)))  # keeps every colour and shape mostly in train
    while True:  # a greedy pick can get stuck under the caps; another shuffle always finds one quickly
        rng.shuffle(pairs)
        chosen: list[tuple[str, str]] = []
        per_colour: dict[str, int] = {}
        per_shape: dict[str, int] = {}
        for c, s in pairs:
            if per_colour.get(c, 0) < cap and per_shape.get(s, 0) < cap:
                chosen.append((c, s))
                per_colour[c] = per_colour.get(c, 0) + 1
                per_shape[s] = per_shape.get(s, 0) + 1
                if len(chosen) == want:
                    return frozenset(chosen)


def seen_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """The combinations of the "train" and "val" splits, in canonical order."""
    held = heldout_pairs(seed)
    return [p for p in all_pairs() if p not in held]


def class_names(split: str = "train", heldout_seed: int = 0) -> list[str]:
    """The "colour shape" class names of a split, in canonical order; labels index into this list."""
    _check_split(split)
    if split == "heldout":
        held = heldout_pairs(heldout_seed)
        return [f"{c} {s}" for c, s in all_pairs() if (c, s) in held]
    return [f"{c} {s}" for c, s in seen_pairs(heldout_seed)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown shapes split {split!r}; choose one of {list(SPLITS)}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ShapeObject, size: bool = False, position: bool = False) -> str:
    """ "a large red star on the left", with the parts asked for."""
    words = ([obj.size] if size else []) + [obj.colour, obj.shape]
    text = f"{_article(words[0])} {' '.join(words)}"
    return f"{text} {POSITION_PHRASES[obj.position]}" if position else text


def close_up(scene: Scene, rng: random.Random) -> Scene:
    """The scene's main object alone, centred (small jitter) and large enough to fill most of the frame."""
    main = scene.main
    x, y = (0.5 + rng.uniform(-_JITTER, _JITTER) for _ in range(2))
    radius = rng.uniform(*_OBJECT_RADIUS)
    main = dataclasses.replace(main, x=x, y=y, radius=radius, size="large", position="center")
    return dataclasses.replace(scene, objects=(main,))


def make_caption(scene: Scene, style: str, rng: random.Random) -> str:
    """One caption of a scene in a caption style; every style names the main object's colour and shape."""
    main, others = scene.main, scene.objects[1:]
    if style == "short":
        return _phrase(main)
    if style == "size":
        return _phrase(main, size=True)
    if style == "position":
        return _phrase(main, position=True)
    if style == "full":
        return _phrase(main, size=True, position=True)
    if style == "terse":
        return f"{main.colour} {main.shape}."
    if style == "photo":
        return rng.choice(_PHOTO_TEMPLATES).format(_phrase(main, size=rng.random() < 0.5))
    parts = [_phrase(main, size=True, position=True)] + [
        _phrase(o, position=rng.random() < 0.5) for o in others
    ]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if style == "scene":
        return f"there is {listed}"
    if style == "count":
        n = len(scene.objects)
        return f"{_NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {listed}"
    raise InputError(f"unknown caption style {style!r}; choose 'mixed' or one of {list(CAPTION_STYLES)}")


def make_qa(scene: Scene, rng: random.Random, allowed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Question/answer pairs about a scene: colour, shape, count, position, size and existence (yes/no)."""
    objs = scene.objects
    main = scene.main
    shapes_here = [o.shape for o in objs]
    where = POSITION_PHRASES[main.position]
    the_shape = f"the {main.shape}" if shapes_here.count(main.shape) == 1 else f"the {main.shape} {where}"
    qa = [
        (f"what color is {the_shape}?", main.colour),
        (f"what shape is {where}?", main.shape),
        ("how many shapes are there?", str(len(objs))),
        (f"where is the {main.name}?", main.position),
        (f"is the {main.name} large or small?", main.size),
    ]
    colour = rng.choice(list(COLOURS))
    qa.append((f"how many {colour} shapes are there?", str(sum(o.colour == colour for o in objs))))
    present = rng.choice(objs)
    qa.append((f"is there {_phrase(present)}?", "yes"))
    here = {(o.colour, o.shape) for o in objs}
    absent = [p for p in allowed if p not in here]
    if absent:
        c, s = rng.choice(absent)
        qa.append((f"is there {_article(c)} {c} {s}?", "no"))
    rng.shuffle(qa)
    return qa


def make_scene(
    rng: random.Random,
    main_pairs: list[tuple[str, str]],
    other_pairs: list[tuple[str, str]],
    max_objects: int,
) -> Scene:
    """Draw the attributes and layout of one scene: distinct slots and (colour, shape) combos, no overlaps."""
    n = rng.randint(1, max_objects)
    slots = rng.sample(list(POSITIONS), n)
    combos = [rng.choice(main_pairs)]
    others = [p for p in other_pairs if p != combos[0]]
    combos += rng.sample(others, n - 1)
    sizes = [rng.choice(SIZES) for _ in range(n)]
    radii = [rng.uniform(*_RADIUS[s]) for s in sizes]
    jitter = [(rng.uniform(-_JITTER, _JITTER), rng.uniform(-_JITTER, _JITTER)) for _ in range(n)]
    _resolve_overlaps(slots, sizes, radii, jitter, rng)
    objects = []
    for (colour, shape), slot, size, radius, (dx, dy) in zip(
        combos, slots, sizes, radii, jitter, strict=True
    ):
        rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLOURS[colour])
        outline = None
        if rng.random() < 0.25:  # a thin dark or light rim: visual variety that no caption mentions
            outline = (25, 25, 25) if rng.random() < 0.5 else (235, 235, 235)
        x, y = POSITIONS[slot]
        objects.append(ShapeObject(shape, colour, size, slot, x + dx, y + dy, radius, rgb, outline))
    kind = rng.choice(BACKGROUNDS)
    return Scene(
        objects=tuple(objects),
        background=kind,
        bg_colours=(_muted(rng), _muted(rng)),
        bg_angle=rng.uniform(0, 2 * math.pi),
        noise_seed=rng.getrandbits(32),
        noise_sigma=rng.uniform(6, 22),
    )


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation background colour, so that the eight saturated object colours always stand out."""
    grey = rng.uniform(35, 215)
    tint = [rng.uniform(-18, 18) for _ in range(3)]
    return tuple(int(min(255.0, max(0.0, grey + t))) for t in tint)


def _resolve_overlaps(
    slots: list[str],
    sizes: list[str],
    radii: list[float],
    jitter: list[tuple[float, float]],
    rng: random.Random,
) -> None:
    """Shrink later objects and drop jitter until all pairs are apart; the main object (0) keeps its size."""
    changed = True
    while changed:
        changed = False
        for i in range(len(slots)):
            for j in range(i + 1, len(slots)):
                (xi, yi), (xj, yj) = POSITIONS[slots[i]], POSITIONS[slots[j]]
                dist = math.hypot(
                    xi + jitter[i][0] - xj - jitter[j][0], yi + jitter[i][1] - yj - jitter[j][1]
                )
                if dist >= radii[i] + radii[j] + _GAP:
                    continue
                changed = True
                if sizes[j] == "large" and sizes[i] == "large":
                    sizes[j], radii[j] = "small", rng.uniform(*_RADIUS["small"])
                else:  # slot centers always leave room for a large and a small object
                    jitter[i] = jitter[j] = (0.0, 0.0)


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centered at (cx, cy) fitting in radius r (pixels); circles are 64-gons."""
    if shape == "circle":
        return _regular(64, cx, cy, r, 0.0)
    if shape == "square":
        h = 0.78 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return _regular(3, cx, cy + 0.15 * r, 1.1 * r, -math.pi / 2)  # lowered so it sits in its circle
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.32 * r
        arm = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        return [(cx + dx, cy + dy) for dx, dy in arm]
    if shape == "heart":
        return [(cx + r * hx, cy + r * hy) for hx, hy in _heart_unit()]
    if shape == "hexagon":
        return _regular(6, cx, cy, r, 0.0)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    raise InputError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def _regular(n: int, cx: float, cy: float, r: float, start: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    ]


@lru_cache(maxsize=1)
def _heart_unit() -> tuple[tuple[float, float], ...]:
    """The classic parametric heart, scaled to fit the unit circle."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y = y - (y.max() + y.min()) / 2
    scale = 1.0 / np.hypot(x, y).max()
    return tuple(zip((x * scale).tolist(), (y * scale).tolist(), strict=True))


def render_background(scene: Scene, size: int) -> Image.Image:
    """The background as an RGB image: a solid colour, a linear gradient, or smooth blotches + fine noise."""
    if scene.background == "solid":
        return Image.new("RGB", (size, size), scene.bg_colours[0])
    c0 = np.asarray(scene.bg_colours[0], dtype=np.float32)
    if scene.background == "gradient":
        c1 = np.asarray(scene.bg_colours[1], dtype=np.float32)
        ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        t = math.cos(scene.bg_angle) * ramp[None, :] + math.sin(scene.bg_angle) * ramp[:, None]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8), "RGB")
    gen = np.random.default_rng(scene.noise_seed)
    coarse = gen.standard_normal((4, 4), dtype=np.float32) * scene.noise_sigma
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    fine = gen.standard_normal((size, size), dtype=np.float32) * (scene.noise_sigma * 0.5)
    grey = (blotches + fine)[..., None]
    return Image.fromarray(np.clip(c0 + grey, 0, 255).astype(np.uint8), "RGB")


def render_scene(scene: Scene, image_size: int = 64, supersample: int = 2) -> Image.Image:
    """Draw a scene as an RGB image; shapes are drawn at `supersample`x, box-downsampled for anti-aliasing."""
    ss = max(1, int(supersample))
    side = image_size * ss
    img = render_background(scene, image_size)
    if ss > 1:  # nearest upsampling, so that the box downsample below gives the background back unchanged
        img = img.resize((side, side), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    rim = max(1, round(side / 64))
    for obj in scene.objects:
        pts = shape_points(obj.shape, obj.x * side, obj.y * side, obj.radius * side)
        draw.polygon(pts, fill=obj.rgb, outline=obj.outline, width=rim if obj.outline else 1)
    return img.reduce(ss) if ss > 1 else img


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style dataset of `size` shapes scenes, each generated from (seed, split, index) when asked for."""

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,
        image_size: int = 64,
        seed: int = 0,
        max_objects: int = 1,
        caption_style: str = "mixed",
        heldout_seed: int = 0,
        supersample: int = 2,
        label_space: str = "split",
        language: str = "en",
        framing: str = "scene",
    ) -> None:
        """Configure the world; nothing is rendered until an index is read.

        `framing`: "scene" (objects at their slots and sizes) or "object" (a close-up: the main object alone,
        centred, filling 60-80% of the frame, captions naming only its colour and shape), which is what a
        small text-to-image model needs to draw recognisable shapes at 32 px.

        `label_space`: "split" labels index the split's own classes (`class_names(split)`); "all" labels index
        every colour-shape combination, so held-out images compete with the seen classes too (the test where
        a memorising model calls an unseen "red star" by a name it saw in training).
        """
        _check_split(split)
        if language not in LANGUAGES:
            raise InputError(f"unknown language {language!r}; choose one of {list(LANGUAGES)}")
        self.language = language
        if label_space not in ("split", "all"):
            raise InputError(f"label_space must be 'split' or 'all', got {label_space!r}")
        if framing not in FRAMINGS:
            raise InputError(f"unknown framing {framing!r}; choose one of {list(FRAMINGS)}")
        self.framing = framing
        if not 1 <= max_objects <= len(POSITIONS):
            raise InputError(f"max_objects must be between 1 and {len(POSITIONS)}, got {max_objects}")
        if caption_style != "mixed" and caption_style not in CAPTION_STYLES:
            raise InputError(
                f"unknown caption style {caption_style!r}; choose 'mixed' or one of {list(CAPTION_STYLES)}"
            )
        if size < 0 or image_size < 8:
            raise InputError(f"need size >= 0 and image_size >= 8, got size={size}, image_size={image_size}")
        self.split, self.size, self.image_size, self.seed = split, int(size), int(image_size), int(seed)
        self.max_objects, self.caption_style, self.heldout_seed = max_objects, caption_style, heldout_seed
        self.supersample = supersample
        self.classes: list[str] = (
            class_names(split, heldout_seed)
            if label_space == "split"
            else [f"{c} {s}" for c, s in all_pairs()]
        )
        self._class_index = {name: i for i, name in enumerate(self.classes)}
        seen = seen_pairs(heldout_seed)
        if split == "heldout":
            held = heldout_pairs(heldout_seed)
            self._main_pairs = [p for p in all_pairs() if p in held]
            self._other_pairs = all_pairs()
        else:  # held-out combinations never appear in train/val, not even as distractors or in questions
            self._main_pairs = self._other_pairs = seen

    def __len__(self) -> int:
        """Number of samples."""
        return self.size

    def _rng(self, index: int) -> random.Random:
        # string seeds are hashed with SHA-512: stable across processes and Python versions
        return random.Random(f"duomo-shapes/{self.seed}/{self.split}/{index}")

    def scene(self, index: int) -> Scene:
        """The scene of an index with its caption and QA (in `metadata`), without rendering: cheap."""
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        index %= self.size
        rng = self._rng(index)
        scene = make_scene(rng, self._main_pairs, self._other_pairs, self.max_objects)
        styles = CAPTION_STYLES
        if self.framing == "object":
            scene, styles = close_up(scene, rng), OBJECT_CAPTION_STYLES
        style = rng.choice(styles) if self.caption_style == "mixed" else self.caption_style
        scene.metadata["caption"] = make_caption(scene, style, rng)
        scene.metadata["qa"] = make_qa(scene, rng, self._other_pairs)
        scene.metadata["index"] = index
        if self.language != "en":  # its own generator: the English stream (and the images) stay as they are
            from duomo.data.shapes_zh import caption_zh, qa_zh

            zh_rng = random.Random(f"duomo-shapes-zh/{self.seed}/{self.split}/{index}")
            if self.language == "zh" or zh_rng.random() < 0.5:
                scene.metadata["caption"] = caption_zh(scene, style, zh_rng)
                scene.metadata["qa"] = qa_zh(scene, scene.metadata["qa"], zh_rng)
                scene.metadata["language"] = "zh"
        return scene

    def texts(self) -> list[str]:
        """Every sample's caption, without rendering images."""
        return [self.scene(i).metadata["caption"] for i in range(self.size)]

    def __getitem__(self, index: int) -> dict:
        """{"image", "text", "label", "label_name", "key", "qa", "objects", "background"} of one index."""
        scene = self.scene(index)
        return {
            "image": render_scene(scene, self.image_size, self.supersample),
            "text": scene.metadata["caption"],
            "label": self._class_index[scene.main.name],
            "label_name": scene.main.name,
            "key": f"shapes-{self.split}-{self.seed}-{scene.metadata['index']:08d}",
            "qa": scene.metadata["qa"],
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position}
                for o in scene.objects
            ],
            "background": scene.background,
        }

    def __repr__(self) -> str:
        """The settings, one line."""
        return (
            f"ShapesDataset(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
            f"seed={self.seed}, max_objects={self.max_objects}, caption_style={self.caption_style!r})"
        )


def demo_samples(image_size: int = 64, n: int = 8, split: str = "val", seed: int = 0) -> list[dict]:
    """n single-object samples of a split with distinct "colour shape" labels (`label_name`), for demos."""
    ds = ShapesDataset(
        split, size=50 * n, image_size=image_size, seed=seed, max_objects=1, caption_style="short"
    )
    picked: dict[str, int] = {}
    for i in range(len(ds)):
        picked.setdefault(ds.scene(i).main.name, i)
        if len(picked) == n:
            break
    return [ds[i] for i in picked.values()]
