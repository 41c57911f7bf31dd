"""The shapes world in Chinese: captions, questions and zero-shot prompts as a Chinese speaker writes them.

Every English word of the world has its Chinese counterpart (红色/蓝色, 圆形/五角星, 左边/中间...), and
each caption style and question has its own Chinese wording, several templates each: not word-for-word
translations ("左边有一个大的红色五角星", "画面中间是一个蓝色的圆形", "五角星是什么颜色的？"). Scenes, and
so images, labels and answers, are exactly the English dataset's: only the texts change (`ShapesDataset(...,
language="zh")`, or "both" for a mix per sample).
"""

from __future__ import annotations

import random

COLOURS_ZH: dict[str, str] = {
    "red": "红色",
    "orange": "橙色",
    "yellow": "黄色",
    "green": "绿色",
    "cyan": "青色",
    "blue": "蓝色",
    "purple": "紫色",
    "pink": "粉色",
}
SHAPES_ZH: dict[str, str] = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "五角星",
    "cross": "十字",
    "heart": "心形",
    "hexagon": "六边形",
    "diamond": "菱形",
}
SIZES_ZH: dict[str, str] = {"small": "小", "large": "大"}
POSITIONS_ZH: dict[str, str] = {
    "left": "左边",
    "right": "右边",
    "top": "上方",
    "bottom": "下方",
    "center": "中间",
}
NUMBERS_ZH = ("零", "一", "两", "三", "四", "五")
ANSWERS_ZH: dict[str, str] = {
    **COLOURS_ZH,
    **SHAPES_ZH,
    **SIZES_ZH,
    **POSITIONS_ZH,
    "yes": "有",
    "no": "没有",
    **{str(n): str(n) for n in range(6)},
}
# zero-shot prompts in the wordings of the Chinese captions
EVAL_TEMPLATES_ZH: tuple[str, ...] = ("{}", "一个{}", "一张{}的照片", "图中是{}", "这是一个{}")


def name_zh(colour: str, shape: str) -> str:
    """A class name in Chinese: "红色五角星"."""
    return f"{COLOURS_ZH[colour]}{SHAPES_ZH[shape]}"


def phrase_zh(obj, size: bool = False, rng: random.Random | None = None) -> str:  # noqa: ANN001
    """ "一个红色的五角星" / "一个大的红色五角星" (the 的 after a lone colour, as one says it)."""
    colour, shape = COLOURS_ZH[obj.colour], SHAPES_ZH[obj.shape]
    if size:
        return f"一个{SIZES_ZH[obj.size]}的{colour}{shape}"
    return f"一个{colour}的{shape}" if rng is None or rng.random() < 0.7 else f"一个{colour}{shape}"


def caption_zh(scene, style: str, rng: random.Random) -> str:  # noqa: ANN001
    """One Chinese caption of a scene in an English caption style's role (every one names the main object)."""
    main, others = scene.main, scene.objects[1:]
    where = POSITIONS_ZH[main.position]
    if style == "short":
        return phrase_zh(main, rng=rng)
    if style == "size":
        return phrase_zh(main, size=True)
    if style == "position":
        return rng.choice(["{w}有{p}", "{p}在{w}", "画面{w}是{p}"]).format(
            w=where, p=phrase_zh(main, rng=rng)
        )
    if style == "full":
        return rng.choice(["{w}有{p}", "画面{w}是{p}"]).format(w=where, p=phrase_zh(main, size=True))
    if style == "terse":
        return f"{name_zh(main.colour, main.shape)}。"
    if style == "photo":
        return rng.choice(["一张{}的照片", "图中是{}", "这是{}", "一幅画，画着{}"]).format(
            phrase_zh(main, rng=rng)
        )
    parts = [f"{POSITIONS_ZH[main.position]}{phrase_zh(main, size=True)}"] + [
        f"{POSITIONS_ZH[o.position]}{phrase_zh(o, rng=rng)}" if rng.random() < 0.5 else phrase_zh(o, rng=rng)
        for o in others
    ]
    listed = parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]
    if style == "scene":
        return f"图中有{listed}"
    return f"一共有{NUMBERS_ZH[len(scene.objects)]}个图形：{listed}"


def qa_zh(scene, english: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:  # noqa: ANN001
    """The Chinese questions of a scene, one per English question (same kind, order), answers in Chinese."""
    main = scene.main
    shapes_here = [o.shape for o in scene.objects]
    the = SHAPES_ZH[main.shape]
    if shapes_here.count(main.shape) > 1:
        the = f"{POSITIONS_ZH[main.position]}的{the}"
    out = []
    for question, answer in english:
        q = question.lower()
        if q.startswith("what color is"):
            zh = rng.choice(["{s}是什么颜色的？", "{s}是什么颜色？"]).format(s=the)
        elif q.startswith("what shape is"):
            zh = rng.choice(["{w}是什么形状？", "{w}的图形是什么形状的？"]).format(
                w=POSITIONS_ZH[main.position]
            )
        elif q == "how many shapes are there?":
            zh = rng.choice(["一共有几个图形？", "图中有多少个图形？"])
        elif q.startswith("how many "):
            colour = q.removeprefix("how many ").split()[0]
            zh = f"有几个{COLOURS_ZH[colour]}的图形？"
        elif q.startswith("where is"):
            zh = rng.choice(["{n}在哪里？", "{n}在哪个位置？"]).format(n=name_zh(main.colour, main.shape))
        elif "large or small" in q:
            zh = f"{name_zh(main.colour, main.shape)}是大的还是小的？"
        else:  # "is there a red star?"
            words = q.removeprefix("is there ").rstrip("?").split()
            zh = f"有{COLOURS_ZH[words[-2]]}的{SHAPES_ZH[words[-1]]}吗？"
        out.append((zh, ANSWERS_ZH[answer]))
    return out
