"""BEiT-3 on shapes: VQA accuracy and caption BLEU-4 / CIDEr-D, fine-tuned with vs without pretraining.

Arms (same fine-tuning data, batch and steps per task):
- scratch:       a fresh backbone, fine-tuned whole;
- mdm:           a fresh backbone, then masked data modelling (MLM + MIM + pairs), fine-tuned whole;
- clip-init:     the vision pathway copied from a duomo CLIP image tower (`--vision-init`), vision frozen
                 while fine-tuning (the README recipe);
- clip-init+mdm: that, then masked language modelling on texts and pairs with the vision pathway frozen
                 (VLMo's second stage); vision frozen while fine-tuning.

    python bench/beit3_shapes.py --config beit3-tiny-conv --vision-init shapes-minilm --loss ce \
        --pretrain-steps 600 --vqa-steps 800 --caption-steps 400 --threads 2 \
        --json bench/results/beit3_shapes.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

from duomo.tasks.beit3.run import BEiT3Run, train_beit3  # noqa: E402


@dataclass
class Arm:
    name: str
    vision_init: bool  # copy the CLIP image tower into the vision pathway
    pretrain: bool  # masked data modelling before fine-tuning
    freeze: bool  # keep vision-only parameters fixed while fine-tuning


ARMS = (
    Arm("scratch", False, False, False),
    Arm("mdm", False, True, False),
    Arm("clip-init", True, False, True),
    Arm("clip-init+mdm", True, True, True),
)


def _train(args: argparse.Namespace, steps: int) -> dict:
    """The trainer fields every run of the bench shares."""
    return {
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "log_every": args.log_every,
        "save_every": steps,
        "quiet": True,
        "plot": False,
        "workers": 0,
    }


def pretrain(arm: Arm, args: argparse.Namespace) -> float:
    """Run the arm's masked data modelling (if it has any) into its folder; the seconds it took."""
    if not arm.pretrain:
        return 0.0
    began = time.perf_counter()
    run = BEiT3Run(
        "pretrain",
        Path(args.tmp) / arm.name,
        config=args.config,
        size=args.size,
        vision_init=args.vision_init if arm.vision_init else None,
        freeze_vision=arm.freeze,  # frozen CLIP tower: MLM on texts and pairs only (VLMo's second stage)
        train=_train(args, args.pretrain_steps),
    )
    list(train_beit3(run, log=lambda _: None))
    seconds = time.perf_counter() - began
    print(json.dumps({"arm": arm.name, "pretrain_s": seconds}), flush=True)
    return seconds


def finetune(arm: Arm, task: str, steps: int, args: argparse.Namespace, pretrain_s: float) -> list[dict]:
    """Fine-tune one task from the arm's start (a fresh copy each time) and evaluate val and held-out."""
    run = BEiT3Run(
        task,
        Path(args.tmp) / f"{arm.name}-{task}",
        config=args.config,
        size=args.size,
        eval_size=args.eval_size,
        loss=args.loss,
        freeze_vision=arm.freeze,
        init=Path(args.tmp) / arm.name if arm.pretrain else None,
        vision_init=args.vision_init if arm.vision_init and not arm.pretrain else None,
        train=_train(args, steps),
    )
    began = time.perf_counter()
    records = list(train_beit3(run, log=lambda _: None))  # training, then the evals
    seconds = time.perf_counter() - began
    rows = []
    for record in records:
        if record.get("decoding", "greedy") != "greedy":
            continue  # starts compared under plain decoding; bench/caption_guidance.py does guidance
        rows.append({"arm": arm.name, **record, "pretrain_s": pretrain_s, "train_s": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_arm(arm: Arm, args: argparse.Namespace) -> list[dict]:
    """Pretrain (if the arm does), fine-tune VQA and captioning, evaluate both splits."""
    pretrain_s = pretrain(arm, args)
    return finetune(arm, "vqa", args.vqa_steps, args, pretrain_s) + finetune(
        arm, "caption", args.caption_steps, args, pretrain_s
    )


def table(rows: list[dict], arms: list[str]) -> str:
    """Markdown: one line per arm and split."""
    lines = [
        "| arm | split | VQA acc | colour | shape | count | position | size | exists | BLEU-4 | CIDEr-D "
        "| pretrain + VQA + caption s | example caption |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for split in ("val", "heldout"):
            v = next(r for r in rows if r["arm"] == arm and r["task"] == "vqa" and r["split"] == split)
            c = next(r for r in rows if r["arm"] == arm and r["task"] == "caption" and r["split"] == split)
            kinds = " | ".join(
                f"{v.get(f'accuracy_{k}', float('nan')):.2f}"
                for k in ("colour", "shape", "count", "position", "size", "exists")
            )
            secs = f"{v['pretrain_s']:.0f} + {v['train_s']:.0f} + {c['train_s']:.0f}"
            lines.append(
                f"| {arm} | {split} | {v['accuracy']:.3f} | {kinds} | {c['bleu4']:.3f} | {c['cider_d']:.3f} "
                f"| {secs} | {c['example']} |"
            )
    return "\n".join(lines)


def main() -> None:
    """Run the arms and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="beit3-tiny-conv")
    p.add_argument("--vision-init", default="shapes-minilm", help="duomo CLIP for the clip-init arms")
    p.add_argument("--arms", nargs="+", default=[a.name for a in ARMS], choices=[a.name for a in ARMS])
    p.add_argument("--loss", default="ce", choices=["bce", "ce"], help="VQA loss")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--vqa-steps", type=int, default=800)
    p.add_argument("--caption-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=2000, help="shapes training images")
    p.add_argument("--eval-size", type=int, default=200, help="images per eval split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--tmp", default="/tmp/duomo-beit3-bench")
    p.add_argument("--json", default=None, help="also write the rows and the machine here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = [row for arm in ARMS if arm.name in args.arms for row in run_arm(arm, args)]
    print(f"\nload average after: {os.getloadavg()}\n")
    print(table(rows, args.arms))
    if args.json:
        write_json(args.json, vars(args), rows, None)


if __name__ == "__main__":
    main()
