"""Zero-shot classification and text->image retrieval of a bilingual model on the shapes world, in Chinese
and in English, on seen pairs (val) and unseen ones (heldout: among the 13 held-out names; heldout-all:
among all 64).

    python bench/shapes_zh.py --model shapes-zh --size 500 --json bench/results/shapes_zh.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

import duomo  # noqa: E402
from duomo.data.shapes import EVAL_TEMPLATES, ShapesDataset, all_pairs  # noqa: E402
from duomo.data.shapes_zh import EVAL_TEMPLATES_ZH, name_zh  # noqa: E402
from duomo.tasks.metrics import retrieval_metrics  # noqa: E402

SPLITS = {"val": ("val", "split"), "heldout": ("heldout", "split"), "heldout-all": ("heldout", "all")}


def zero_shot(pipe: duomo.Pipeline, split: str, size: int, language: str, seed: int) -> float:
    """Top-1 of the main object's colour+shape name among the split's classes (or all 64 pairs)."""
    name, space = SPLITS[split]
    ds = ShapesDataset(
        name, size=size, image_size=pipe.config.vision.image_size, seed=seed, label_space=space, max_objects=1
    )
    names = list(ds.classes) if space == "split" else [f"{c} {s}" for c, s in all_pairs()]
    if language == "zh":
        labels = [name_zh(*n.split()) for n in names]
        templates = list(EVAL_TEMPLATES_ZH)
    else:
        labels, templates = names, list(EVAL_TEMPLATES)
    images = [ds[i]["image"] for i in range(size)]
    probs = pipe.zero_shot_probs(images, labels, templates)
    targets = torch.tensor([ds[i]["label"] for i in range(size)])
    return float((probs.argmax(-1) == targets).float().mean())


def retrieval(pipe: duomo.Pipeline, split: str, size: int, language: str, seed: int) -> dict[str, float]:
    """text->image R@1/5 with each image's own caption as the query (captions in `language`)."""
    ds = ShapesDataset(
        SPLITS[split][0],
        size=size,
        image_size=pipe.config.vision.image_size,
        seed=seed,
        language=language,
        max_objects=2,
    )
    images = pipe.encode_image([ds[i]["image"] for i in range(size)])
    texts = pipe.encode_text([ds[i]["text"] for i in range(size)])
    m = retrieval_metrics(images @ texts.T, torch.arange(size))
    return {"t2i_R@1": m["t2i_R@1"], "t2i_R@5": m["t2i_R@5"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-zh")
    p.add_argument("--size", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    pipe = duomo.load(args.model)
    rows = []
    for split in SPLITS:
        for language in ("zh", "en"):
            row = {
                "split": split,
                "language": language,
                "zero_shot_top1": zero_shot(pipe, split, args.size, language, args.seed),
            }
            if split != "heldout-all":
                row.update(retrieval(pipe, split, args.size, language, args.seed))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| split | language | zero-shot top-1 | text->image R@1 | R@5 |")
    print("|---|---|---|---|---|")
    for r in rows:
        r1, r5 = r.get("t2i_R@1"), r.get("t2i_R@5")
        print(
            f"| {r['split']} | {r['language']} | {r['zero_shot_top1']:.3f} | "
            f"{'' if r1 is None else f'{r1:.3f}'} | {'' if r5 is None else f'{r5:.3f}'} |"
        )
    if args.json:
        write_json(args.json, vars(args), rows, None)


if __name__ == "__main__":
    main()
