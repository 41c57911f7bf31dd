"""Embedding big JPEGs: full decode vs reduced-scale decode (`load_image(min_side=4 x model size)`), images/s
and the cosine between the two paths' embeddings, interleaved in one process.

    python bench/jpeg_draft.py --models shapes-minilm ViT-B-32 --megapixels 24 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

import duomo  # noqa: E402
from duomo.data.images import load_image  # noqa: E402

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
]


def make_jpegs(folder: Path, megapixels: float) -> list[Path]:
    """scikit-image's sample photos upscaled to `megapixels` and saved as quality-90 JPEGs."""
    import skimage.data

    out = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = (megapixels * 1e6 / (image.width * image.height)) ** 0.5
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        path = folder / f"{name}.jpg"
        image.save(path, quality=90)
        out.append(path)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["shapes-minilm", "ViT-B-32"])
    p.add_argument("--megapixels", type=float, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    files = make_jpegs(Path(tempfile.mkdtemp()), args.megapixels)
    rows = []
    for name in args.models:
        pipe = duomo.load(name)

        def full(pipe=pipe) -> torch.Tensor:  # noqa: ANN001
            return torch.stack([pipe.transform(load_image(f)) for f in files])

        def draft(pipe=pipe) -> torch.Tensor:  # noqa: ANN001
            return torch.stack([pipe.preprocess(str(f)) for f in files])

        times: dict[str, list[float]] = {"full decode": [], "reduced-scale decode": []}
        for _ in range(args.rounds):
            for label, fn in (("full decode", full), ("reduced-scale decode", draft)):
                start = time.perf_counter()
                pixels = fn()
                pipe.encode_pixels(pixels)
                times[label].append(len(files) / (time.perf_counter() - start))
        a, b = pipe.encode_pixels(full()), pipe.encode_pixels(draft())
        cos = (a * b).sum(-1)
        row = {
            "model": name,
            **{k: statistics.median(v) for k, v in times.items()},
            "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()),
        }
        rows.append(row)
        print(row)
    print("| model | full decode images/s | reduced-scale images/s | x | min cosine | mean cosine |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['full decode']:.2f} | {r['reduced-scale decode']:.2f} | "
            f"{r['reduced-scale decode'] / r['full decode']:.1f} | "
            f"{r['min_cosine']:.5f} | {r['mean_cosine']:.5f} |"
        )
    if args.json:
        write_json(args.json, vars(args), rows, None)


if __name__ == "__main__":
    main()
