"""Worker x thread layouts of the bulk paths, interleaved in one process: one worker with every core (1x2 on
two cores) against one 1-thread worker per core (2x1), for the model call alone and for `duomo embed`'s whole
path (decode + model) on a folder of generated JPEGs; and which layout "auto" picks.

    python bench/layout_bench.py --model ViT-B-32 --batch 32 --rounds 6 --files 192

ViT-B-32 has random weights here (no download); speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duomo  # noqa: E402
from duomo.tasks.clip.embed import embed_image_files  # noqa: E402
from duomo.tasks.layout import LayoutEncoder, parse_layout  # noqa: E402


def write_jpegs(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--files", type=int, default=192)
    ap.add_argument("--out", default="bench/results/layout.json")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    torch.manual_seed(0)
    pipe = duomo.load(args.model)
    size = pipe.transform.image_size
    pixels = torch.randn(args.batch, 3, size, size)
    layouts = ["1x2", "2x1"] if cores == 2 else [f"1x{cores}", f"{cores}x1"]
    encoders = {name: LayoutEncoder(pipe.encode_pixels, parse_layout(name), cores=cores) for name in layouts}
    for enc in encoders.values():
        enc(pixels)  # warm-up
    model_rates: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, enc in encoders.items():  # A B A B ...
            start = time.perf_counter()
            enc(pixels)
            model_rates[name].append(args.batch / (time.perf_counter() - start))
    auto = LayoutEncoder(pipe.encode_pixels, None, cores=cores, remember=False)
    for _ in range(6):
        auto(pixels)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_jpegs(Path(tmp), args.files)
        path_rates: dict[str, list[float]] = {name: [] for name in layouts}
        for _ in range(max(2, args.rounds // 2)):
            for name in layouts:
                start = time.perf_counter()
                embed_image_files(pipe, files, args.batch, layout=name)
                path_rates[name].append(len(files) / (time.perf_counter() - start))
    base = layouts[0]
    result = {
        "model": args.model, "batch": args.batch, "cores": cores, "torch": torch.__version__,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "model_call_images_per_s": {n: round(statistics.median(r), 2) for n, r in model_rates.items()},
        "embed_path_images_per_s": {n: round(statistics.median(r), 2) for n, r in path_rates.items()},
        "auto_chose": str(auto.layout), "auto_says": auto.describe(),
    }  # fmt: skip
    for key in ("model_call_images_per_s", "embed_path_images_per_s"):
        rates = result[key]
        result[key.replace("images_per_s", "ratio_to_" + base)] = {
            n: round(r / rates[base], 3) for n, r in rates.items()
        }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
