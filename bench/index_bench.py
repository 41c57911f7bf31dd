"""Indexing throughput (images/s) of `ImageIndex.update` against a plain `Pipeline.encode_image` loop.

    python bench/index_bench.py                               # 300 JPEGs of 1024x768, ViT-micro and ViT-B-32
    python bench/index_bench.py --images 100 --models ViT-micro --out results.json

The peer is the simplest correct way to embed a folder with duomo: `encode_image` on batches of paths
(decoding in the calling thread, no hashing, no database). The index adds hashing, SQLite commits per batch
and decoding on worker threads ahead of the model. Also timed: a no-op re-run, and re-indexing after every
file was renamed (vectors reused by content hash, no model call). Images are smooth random colour fields
saved as JPEG (quality 90), so decoding costs what a photo of that size costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duomo  # noqa: E402
from duomo.index import ImageIndex  # noqa: E402


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """count photo-sized JPEGs: bilinear-upsampled random 8x6 colour grids, so they compress like photos."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        path = folder / f"{i // 100:03d}" / f"photo{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        small.resize(size, Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def peer(pipe: duomo.Pipeline, paths: list[Path], batch_size: int) -> float:
    """Seconds for encode_image over all paths in batches."""
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        pipe.encode_image([str(p) for p in paths[i : i + batch_size]], batch_size=batch_size)
    return time.perf_counter() - start


def index_run(pipe: duomo.Pipeline, root: Path, index_dir: Path, batch_size: int, workers: int) -> float:
    """Seconds for a fresh index of root."""
    shutil.rmtree(index_dir, ignore_errors=True)
    with ImageIndex.open(index_dir, pipe) as idx:
        report = idx.update([root], progress=False, batch_size=batch_size, workers=workers)
    assert report.embedded == report.added, report
    return report.seconds


def bench_model(name: str, root: Path, paths: list[Path], tmp: Path, batch_size: int, repeats: int) -> dict:
    pipe = duomo.load(name, device="cpu")
    pipe.encode_image([str(paths[0])])  # warm-up
    n = len(paths)
    result: dict = {"model": name, "images": n, "batch_size": batch_size}
    result["peer_img_s"] = n / statistics.median(peer(pipe, paths, batch_size) for _ in range(repeats))
    for workers in (0, 2):
        secs = statistics.median(
            index_run(pipe, root, tmp / "idx", batch_size, workers) for _ in range(repeats)
        )
        result[f"index_w{workers}_img_s"] = n / secs
    with ImageIndex.open(tmp / "idx", pipe) as idx:
        result["noop_rerun_s"] = idx.update(progress=False).seconds
        moved = root.with_name(root.name + "_renamed")
        root.rename(moved)
        try:
            report = idx.update([moved], progress=False)
            result["rename_all_s"], result["rename_reused"] = report.seconds, report.reused
        finally:
            moved.rename(root)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--models", nargs="+", default=["ViT-micro", "ViT-B-32"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    import torch

    threads = torch.get_num_threads()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = make_images(tmp / "photos", args.images, (width, height))
        for name in args.models:
            rows.append(bench_model(name, tmp / "photos", paths, tmp, args.batch_size, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.images} JPEGs of {width}x{height}, batch {args.batch_size}, median of {args.repeats}:\n")
    print(
        "| model | peer encode_image img/s | index, 0 workers | index, 2 workers | ratio | no-op re-run s |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['peer_img_s']} | {r['index_w0_img_s']} | {r['index_w2_img_s']} | "
            f"{r['index_w2_img_s'] / r['peer_img_s']:.2f}× | {r['noop_rerun_s']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
