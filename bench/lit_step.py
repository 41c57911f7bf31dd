"""LiT step time with and without caching the frozen text tower's features (recipes/shapes-minilm.json),
runs interleaved A/B/A/B in one process; the median samples/s of the steps after the first `--skip`.

    python bench/lit_step.py --steps 60 --rounds 3 --json bench/results/lit_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

from duomo.train.config import TrainConfig  # noqa: E402
from duomo.train.run import train  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "shapes-minilm.json"


def run(cache: bool, steps: int, skip: int) -> float:
    """Median samples/s of one short run."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_json(RECIPE).replace(
            steps=steps, out=out, cache_frozen=cache, log_every=1, quiet=True, plot=False, save_every=steps
        )
        train(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in records[skip:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="first steps left out (warm-up, first-seen captions)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    runs: dict[str, list[float]] = {"recompute": [], "cached": []}
    for _ in range(args.rounds):
        runs["recompute"].append(run(False, args.steps, args.skip))
        runs["cached"].append(run(True, args.steps, args.skip))
    median = {k: statistics.median(v) for k, v in runs.items()}
    print("| frozen MiniLM tower | samples/s (median of rounds) | x recompute |")
    print("|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} | {value / median['recompute']:.2f} |")
    if args.json:
        write_json(args.json, vars(args), [runs], median)


if __name__ == "__main__":
    main()
