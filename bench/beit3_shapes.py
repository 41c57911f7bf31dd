"""BEiT-3 on shapes: VQA accuracy and caption BLEU-4 / CIDEr-D, fine-tuned with vs without MDM pretraining.

Both arms get the same fine-tuning budget (steps, batch, lr, data); the pretrained arm first runs
`--pretrain-steps` of masked data modelling (MLM + MIM + pairs) on the shapes train split.

    python bench/beit3_shapes.py --config beit3-tiny-conv --loss ce --pretrain-steps 600 --finetune-steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from duomo.tasks import caption, vqa
from duomo.train import mdm


def run_arm(name: str, pretrained: mdm.BEiT3ForMDM | None, args: argparse.Namespace) -> list[dict]:
    """Fine-tune VQA and captioning (from `pretrained` or from scratch) and evaluate both splits."""
    rows = []
    torch.manual_seed(args.seed)
    model = vqa.new_vqa_model(args.config, mdm.load_mdm(args.tmp).beit3 if pretrained is not None else None)
    train = vqa.ShapesVQA("train", args.size, model.beit3.cfg, model.answers, seed=args.seed)
    start = time.perf_counter()
    vqa.finetune_vqa(
        model, train, args.finetune_steps, args.batch_size, args.lr, args.seed, args.log_every, loss=args.loss
    )
    seconds = time.perf_counter() - start
    for split, data in vqa.vqa_splits(model.beit3.cfg, args.eval_size, args.seed).items():
        rows.append(
            {"arm": name, "task": "vqa", "split": split, "train_s": seconds, **vqa.evaluate_vqa(model, data)}
        )
        print(json.dumps(rows[-1]), flush=True)

    start_from = mdm.load_mdm(args.tmp) if pretrained is not None else None
    cfg = model.beit3.cfg
    train = caption.ShapesCaptions("train", args.size, cfg, seed=args.seed)
    torch.manual_seed(args.seed)
    cap = caption.new_caption_model(cfg, start_from, vocab=train.vocabulary())
    start = time.perf_counter()
    caption.finetune_caption(
        cap, train, args.finetune_steps, args.batch_size, args.lr, args.seed, args.log_every
    )
    seconds = time.perf_counter() - start
    for split in ("val", "heldout"):
        data = caption.ShapesCaptions(split, args.eval_size, cap.beit3.cfg, seed=args.seed + 1)
        rows.append(
            {
                "arm": name,
                "task": "caption",
                "split": split,
                "train_s": seconds,
                **caption.evaluate_caption(cap, data),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    """Run both arms and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="beit3-tiny")
    p.add_argument("--loss", default="bce", choices=["bce", "ce"], help="VQA loss")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=2000, help="shapes training images")
    p.add_argument("--eval-size", type=int, default=200, help="images per eval split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--tmp", default="/tmp/duomo-beit3-bench-mdm")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}", flush=True)

    start = time.perf_counter()
    pretrained, records = mdm.pretrain_shapes(
        args.config, args.pretrain_steps, args.batch_size, args.lr, args.size, args.seed, args.log_every
    )
    pre_s = time.perf_counter() - start
    mdm.save_mdm(pretrained, args.tmp)  # each fine-tune starts from a fresh copy of the same weights
    print(json.dumps({"pretrain_s": pre_s, "last": records[-1]}), flush=True)

    rows = run_arm("scratch", None, args) + run_arm("mdm", pretrained, args)
    print(f"\nload average after: {os.getloadavg()}; pretraining {pre_s:.0f} s\n")
    print("| arm | split | VQA acc | majority | caption BLEU-4 | CIDEr-D | example caption |")
    print("|---|---|---|---|---|---|---|")
    for arm in ("scratch", "mdm"):
        for split in ("val", "heldout"):
            v = next(r for r in rows if r["arm"] == arm and r["task"] == "vqa" and r["split"] == split)
            c = next(r for r in rows if r["arm"] == arm and r["task"] == "caption" and r["split"] == split)
            print(
                f"| {arm} | {split} | {v['accuracy']:.3f} | {v['majority_baseline']:.3f} | "
                f"{c['bleu4']:.3f} | {c['cider_d']:.3f} | {c['example']} |"
            )


if __name__ == "__main__":
    main()
