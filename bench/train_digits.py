"""LiT on handwritten digits: a frozen pretrained MiniLM text tower, an image tower trained from scratch.

    duomo train --config recipes/digits-minilm.json --out runs/digits-minilm    # the training run
    python bench/train_digits.py ship runs/digits-minilm            # -> duomo/weights/digits-minilm
    python bench/train_digits.py eval duomo/weights/digits-minilm
    python bench/train_digits.py bench --seeds 0 1 2 --json bench/results/train_digits.json

Zero-shot top-1 on the `test` split (359 scans) with `EVAL_TEMPLATES`, prompts whose wordings never occur in
training (the train captions come from `TRAIN_TEMPLATES`), scored by `duomo.tasks.clip.evaluate.evaluate`. A
second score with the training templates shows how much the unseen wordings cost.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import ship, write_json  # noqa: E402

import duomo  # noqa: E402
from duomo.data.digits import EVAL_TEMPLATES, TRAIN_TEMPLATES  # noqa: E402
from duomo.train.config import TrainConfig  # noqa: E402

RECIPE = ROOT / "recipes" / "digits-minilm.json"
WEIGHTS = ROOT / "duomo" / "weights" / "digits-minilm"
# the training templates that use the number word ({}), the placeholder zero-shot prompts fill
SEEN_TEMPLATES = tuple(t for t in TRAIN_TEMPLATES if "{digit}" not in t)


def evaluate_digits(pipe: Any) -> dict[str, float]:
    """Zero-shot top-1 / mean per-class recall on digits `test`: unseen prompts, and the training prompts."""
    from duomo.tasks.clip.evaluate import evaluate

    out: dict[str, float] = {}
    for name, templates in (("unseen", EVAL_TEMPLATES), ("seen", SEEN_TEMPLATES)):
        [record] = evaluate(pipe, "digits", tasks=("zeroshot",), templates=templates)
        out[f"{name}_prompts_top1"] = record["metrics"]["top1"]
        out[f"{name}_prompts_mpcr"] = record["metrics"]["mean_per_class_recall"]
    return out


def cmd_bench(args: argparse.Namespace) -> None:
    """Train the recipe for each seed, evaluate, print the runs and the medians."""
    from duomo.train.run import train

    overrides = json.loads(args.override) if args.override else {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = TrainConfig.from_json(args.recipe).replace(**overrides)
            cfg = cfg.replace(seed=seed, out=str(Path(tmp) / f"seed-{seed}"), quiet=True, plot=False,
                              save_every=cfg.steps)  # fmt: skip
            load = [round(x, 2) for x in os.getloadavg()]
            start = time.perf_counter()
            result = train(cfg)
            seconds = time.perf_counter() - start
            pipe = duomo.load(str(result["model"]), device="cpu")
            size = sum(p.stat().st_size for p in Path(result["model"]).iterdir())
            run = {"seed": seed, "train_s": round(seconds, 1), "steps": cfg.steps, "checkpoint_bytes": size,
                   "load_before": load, **evaluate_digits(pipe)}  # fmt: skip
            runs.append(run)
            print(json.dumps(run), flush=True)
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(json.dumps({"median": median, "seeds": len(runs)}))
    if args.json:
        write_json(args.json, TrainConfig.from_json(args.recipe).replace(**overrides).to_dict(), runs, median)


def cmd_ship(args: argparse.Namespace) -> None:
    """Copy a run's final model into duomo/weights/<name>, with its prompt templates in the meta."""
    target = ship(args.run, Path(args.out or WEIGHTS), {"templates": list(EVAL_TEMPLATES)}, half=False)
    print(json.dumps(evaluate_digits(duomo.load(str(target), device="cpu"))))


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a saved model (a path or a shipped name)."""
    print(json.dumps(evaluate_digits(duomo.load(args.model, device="cpu"))))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="train the recipe for several seeds and evaluate")
    b.add_argument("--recipe", default=str(RECIPE))
    b.add_argument("--seeds", nargs="+", type=int, default=[0])
    b.add_argument("--override", default=None, help='JSON of recipe fields, e.g. {"steps": 100}')
    b.add_argument("--json", default=None, help="write runs and medians here")
    b.set_defaults(func=cmd_bench)
    s = sub.add_parser("ship", help="write a run's model into duomo/weights")
    s.add_argument("run")
    s.add_argument("--out", default=None)
    s.set_defaults(func=cmd_ship)
    e = sub.add_parser("eval", help="zero-shot of a saved model on digits test")
    e.add_argument("model")
    e.set_defaults(func=cmd_eval)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
