"""Caption decoding on shapes: greedy vs beam search vs CLIP-guided beam search, on trained captioners.

For each captioner folder (`duomo beit3-train caption --out`) and split, every decoding captions the same
images: corpus BLEU-4 and CIDEr-D against the per-style references, the share of captions whose first
"colour shape" is an object of the image ("grounded") and is its main object ("main"), and seconds per image.
Held-out images show colour+shape pairs the captioner never saw. The guide is the captioner's recorded
--vision-init CLIP unless --guide names one.

    python bench/caption_guidance.py runs/beit3/caption --threads 2 --json bench/results/caption_guidance.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

from duomo.io.beit3_tasks import load_task  # noqa: E402
from duomo.tasks.beit3 import caption  # noqa: E402
from duomo.tasks.beit3.caption_guide import resolve_guide  # noqa: E402

# (name, beam, guide weight); weight None: unguided
DECODINGS = (
    ("greedy", 1, None),
    ("beam 8", 8, None),
    ("guided beam 8, w 0.5 (default)", 8, 0.5),
    ("guided beam 8, w 1", 8, 1.0),
    ("guided beam 5, w 0.5", 5, 0.5),
    ("guided beam 16, w 0.5", 16, 0.5),
)


def run(folder: str, args: argparse.Namespace) -> list[dict]:
    """Every decoding of one captioner on both splits."""
    model, config = load_task(folder, "caption")
    rows = []
    for split in ("val", "heldout"):
        data = caption.shapes_eval_set(split, args.eval_size, model.beit3.cfg, seed=args.seed)
        for name, beam, weight in DECODINGS:
            guide = None if weight is None else resolve_guide(config.get("vision_init"), args.guide, weight)
            if weight is not None and guide is None:
                print(f"{folder}: no guide recorded or given; skipping {name}", flush=True)
                continue
            began = time.perf_counter()
            scores = caption.evaluate_caption(model, data, beam=beam, guide=guide)
            seconds = (time.perf_counter() - began) / len(data)
            row = {"model": folder, "split": split, "decoding": name, "s_per_image": seconds, **scores}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, one line per model, split and decoding; time relative to greedy on the same split."""
    lines = [
        "| model | split | decoding | grounded | main | BLEU-4 | CIDEr-D | ms/image | x greedy | example |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        greedy = next(g for g in rows if g["model"] == r["model"] and g["split"] == r["split"])
        lines.append(
            f"| {Path(r['model']).parent.name}/{Path(r['model']).name} | {r['split']} | {r['decoding']} "
            f"| {r['grounded']:.2f} | {r['main']:.2f} "
            f"| {r['bleu4']:.3f} | {r['cider_d']:.3f} | {1000 * r['s_per_image']:.0f} "
            f"| {r['s_per_image'] / greedy['s_per_image']:.1f} | {r['example']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Evaluate the decodings of the given captioners and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="captioning model folders")
    p.add_argument("--guide", default="auto", help="auto (recorded --vision-init) or a duomo CLIP")
    p.add_argument("--eval-size", type=int, default=200, help="images per split")
    p.add_argument("--seed", type=int, default=1, help="eval images' seed (beit3-train uses its seed + 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows and the machine here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = [row for folder in args.models for row in run(folder, args)]
    print(f"\nload average after: {os.getloadavg()}\n")
    print(table(rows))
    if args.json:
        write_json(args.json, vars(args), rows, None)


if __name__ == "__main__":
    main()
