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

from duomo.models.beit3 import BEiT3  # noqa: E402
from duomo.models.beit3.from_clip import freeze_vision, start_backbone  # noqa: E402
from duomo.tasks.beit3 import caption, vqa  # noqa: E402
from duomo.train import mdm  # noqa: E402


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


def pretrain(arm: Arm, args: argparse.Namespace) -> float:
    """Run the arm's masked data modelling (if it has any) into its folder; the seconds it took."""
    if not arm.pretrain:
        return 0.0
    began = time.perf_counter()
    model, records = mdm.pretrain_shapes(
        args.config,
        args.pretrain_steps,
        args.batch_size,
        args.lr,
        args.size,
        args.seed,
        args.log_every,
        args.vision_init if arm.vision_init else None,
        freeze_vision=arm.freeze,  # frozen CLIP tower: MLM on texts and pairs only (VLMo's second stage)
    )
    seconds = time.perf_counter() - began
    mdm.save_mdm(model, Path(args.tmp) / arm.name)  # each task starts from a fresh copy of the same weights
    print(json.dumps({"arm": arm.name, "pretrain_s": seconds, "last": records[-1]}), flush=True)
    return seconds


def start_for(arm: Arm, args: argparse.Namespace) -> tuple[mdm.BEiT3ForMDM | None, BEiT3]:
    """A fresh copy of the arm's start: (the pretrained model or None, its backbone)."""
    torch.manual_seed(args.seed)
    if arm.pretrain:
        pretrained = mdm.load_mdm(Path(args.tmp) / arm.name)
        return pretrained, pretrained.beit3
    return None, start_backbone(args.config, args.vision_init if arm.vision_init else None)


def run_arm(arm: Arm, args: argparse.Namespace) -> list[dict]:
    """Pretrain (if the arm does), fine-tune VQA and captioning, evaluate both splits."""
    pretrain_s = pretrain(arm, args)
    rows = []
    _, backbone = start_for(arm, args)
    model = vqa.new_vqa_model(args.config, backbone)
    if arm.freeze:
        freeze_vision(model)
    train = vqa.ShapesVQA("train", args.size, model.beit3.cfg, model.answers, seed=args.seed)
    began = time.perf_counter()
    vqa.finetune_vqa(
        model, train, args.vqa_steps, args.batch_size, args.lr, args.seed, args.log_every, loss=args.loss
    )
    seconds = time.perf_counter() - began
    for split, data in vqa.vqa_splits(model.beit3.cfg, args.eval_size, args.seed).items():
        row = {"arm": arm.name, "task": "vqa", "split": split, "pretrain_s": pretrain_s, "train_s": seconds}
        rows.append({**row, **vqa.evaluate_vqa(model, data)})
        print(json.dumps(rows[-1]), flush=True)

    pretrained, backbone = start_for(arm, args)
    train = caption.ShapesCaptions("train", args.size, backbone.cfg, seed=args.seed)
    torch.manual_seed(args.seed)
    cap = caption.new_caption_model(backbone.cfg, pretrained, train.vocabulary(), backbone)
    if arm.freeze:
        freeze_vision(cap)
    began = time.perf_counter()
    caption.finetune_caption(
        cap, train, args.caption_steps, args.batch_size, args.lr, args.seed, args.log_every
    )
    seconds = time.perf_counter() - began
    for split in ("val", "heldout"):
        data = caption.ShapesCaptions(split, args.eval_size, cap.beit3.cfg, seed=args.seed + 1)
        row = {"arm": arm.name, "task": "caption", "split": split}
        row |= {"pretrain_s": pretrain_s, "train_s": seconds}
        rows.append({**row, **caption.evaluate_caption(cap, data)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


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
