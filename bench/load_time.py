"""How long loading a checkpoint takes: duomo (no random init before the weights), duomo with random init
first (how it loaded before), and open_clip reading the same weights, interleaved A/B/C in one process.

    python bench/load_time.py --model ViT-B-32 --rounds 7 --json bench/results/load_time.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

import duomo  # noqa: E402
import duomo.io.resolve as resolve  # noqa: E402
from duomo.io import export  # noqa: E402


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    pipe = duomo.load(args.model)  # random weights, saved in duomo's format and OpenCLIP's
    pipe.save(folder / "duomo")
    export(pipe.model, folder / "openclip.safetensors", "openclip")
    del pipe

    def duomo_now() -> None:
        duomo.load(folder / "duomo")

    def duomo_with_init() -> None:
        original = resolve.skip_init
        resolve.skip_init = contextlib.nullcontext  # build with random init, then overwrite (as before)
        try:
            duomo.load(folder / "duomo")
        finally:
            resolve.skip_init = original

    arms = {"duomo (no init)": duomo_now, "duomo (random init first)": duomo_with_init}
    try:
        import open_clip

        def open_clip_load(model: str = args.model) -> None:
            open_clip.create_model(model, pretrained=str(folder / "openclip.safetensors"))

        arms["open_clip"] = open_clip_load
    except ImportError:
        pass
    for fn in arms.values():  # warm-up: imports, allocator
        fn()
    runs = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            runs[name].append(timed(fn))
    median = {name: statistics.median(v) for name, v in runs.items()}
    ref = median.get("open_clip")
    print(f"| loader | median s ({args.rounds} interleaved rounds) | x open_clip |")
    print("|---|---|---|")
    for name, m in median.items():
        print(f"| {name} | {m:.3f} | {(ref / m if ref else float('nan')):.2f} |")
    if args.json:
        write_json(args.json, vars(args), [runs], median)


if __name__ == "__main__":
    main()
