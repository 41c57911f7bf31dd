"""Train tiny CLIPs on the shapes world with duomo and with open_clip, same data, budget and size; compare.

    python bench/train_shapes.py bench                      # the first five rows below; seed 0
    python bench/train_shapes.py bench --seeds 0 1 2 --json bench/results/train_shapes.json
    python bench/train_shapes.py ship runs/shapes-tiny      # after duomo train -c recipes/shapes-tiny.json
    python bench/train_shapes.py eval duomo/weights/shapes-tiny

Rows (all from one recipe, `recipes/shapes-tiny.json`: same data, steps, batch, optimiser, model size):

- `open_clip`: open_clip's own `open_clip.model.CLIP` (the plain ViT config `shapes-tiny`, converted),
  `open_clip.loss.ClipLoss`, AdamW with open_clip's weight-decay rule (no decay for gains, biases and
  `logit_scale`), warm-up + cosine as in open_clip_train, the temperature clamped to ln(100) after each step,
  open_clip's tokenizer and `image_transform`, and batches from the same `ShapesDataset`;
- `duomo`: `duomo.train.run.train` (what `duomo train --config` runs), the same plain ViT: the engines alone;
- `duomo+conv`: the ViT with a convolutional stem (`shapes-tiny-conv`, +3% parameters);
- `duomo+conv+hn`: that, with 3 NegCLIP swap negatives per image, restricted to word pairs seen in the
  training captions;
- `duomo+conv+LiT`: the conv-stem image tower with a frozen pretrained MiniLM text tower
  (`ViT-tiny-conv-MiniLM`, `recipes/shapes-minilm.json`, shipped as `shapes-minilm`);
- `duomo+conv+hn-unrestricted` (not run by default): the swaps without the seen-pair restriction.

Every model is scored by the same code (`duomo.tasks.clip.evaluate.evaluate`) with the same prompt templates:
zero-shot top-1 on `val` (seen colour-shape pairs, 51 classes), `heldout` (13 pairs never seen in training,
13 classes) and `heldout-all` (the held-out images against all 64 names, seen ones included), and
text->image R@1 over each split's captions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import ship, write_json  # noqa: E402

import duomo  # noqa: E402
from duomo.data.shapes import EVAL_TEMPLATES as SHAPES_TEMPLATES  # noqa: E402
from duomo.data.shapes import ShapesDataset  # noqa: E402
from duomo.train.config import TrainConfig  # noqa: E402

RECIPE = ROOT / "recipes" / "shapes-tiny.json"
WEIGHTS = ROOT / "duomo" / "weights" / "shapes-tiny"


# ---- evaluation -------------------------------------------------------------------------------------------


def evaluate_shapes(
    pipe: Any, size: int = 1000, templates: tuple[str, ...] = SHAPES_TEMPLATES
) -> dict[str, float]:
    """Zero-shot top-1 on val, heldout, heldout-all; R@1 on val and heldout; by duomo's evaluator."""
    from duomo.tasks.clip.evaluate import evaluate

    out: dict[str, float] = {}
    both = ("zeroshot", "retrieval")
    records = evaluate(pipe, "shapes:val", tasks=both, size=size, templates=templates)
    records += evaluate(pipe, "shapes:heldout", tasks=both, size=size, templates=templates)
    records += evaluate(pipe, "shapes:heldout-all", tasks=("zeroshot",), size=size, templates=templates)
    for record in records:
        split, m = record["split"], record["metrics"]
        if record["task"] == "zeroshot":
            out[f"{split}_top1"] = m["top1"]
        else:
            out[f"{split}_t2i_R@1"] = m["t2i_R@1"]
            out[f"{split}_i2t_R@1"] = m["i2t_R@1"]
    return out


class OpenClipPipe:
    """The slice of `duomo.Pipeline` that the evaluator uses, around an open_clip model and its own tools."""

    def __init__(self, model: torch.nn.Module, image_size: int, context_length: int) -> None:
        import open_clip

        self.model = model.eval()
        self.name = "open_clip"
        self.meta: dict[str, Any] = {}
        self.transform = open_clip.image_transform(image_size, is_train=False)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
        self.config = type("Cfg", (), {"vision": type("V", (), {"image_size": image_size})()})()

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings."""
        return self.model.encode_image(pixels, normalize=True).float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings."""
        out = [self.model.encode_text(self.tokenizer(texts[i : i + 256]), normalize=True) for i in
               range(0, len(texts), 256)]  # fmt: skip
        return torch.cat(out).float()


# ---- training ---------------------------------------------------------------------------------------------


def recipe(path: Path = RECIPE, **overrides: Any) -> TrainConfig:
    """The recipe's TrainConfig with fields overridden."""
    return TrainConfig.from_json(path).replace(**overrides)


def train_duomo(cfg: TrainConfig) -> tuple[duomo.Pipeline, float]:
    """`duomo train` in-process; returns the trained pipeline and the wall-clock seconds of `train`."""
    from duomo.train.run import train

    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    return duomo.load(str(result["model"]), device="cpu"), seconds


class _OpenClipCollate:
    """Samples -> (open_clip train-transformed pixels, open_clip tokens)."""

    def __init__(self, transform: Any, tokenizer: Any) -> None:
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([self.transform(s["image"]) for s in samples])
        return pixels, self.tokenizer([s["text"] for s in samples])


def openclip_lr(step: int, base: float, warmup: int, steps: int) -> float:
    """open_clip_train's `cosine_lr`: linear warm-up (base * (step + 1) / warmup), then half a cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, steps - warmup
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def train_openclip(cfg: TrainConfig) -> tuple[OpenClipPipe, float]:
    """A minimal open_clip training loop with the recipe's model, data, batch, steps and optimiser."""
    import open_clip
    from open_clip.loss import ClipLoss

    from duomo.io import duomo_config_to_openclip
    from duomo.models import get_model_config

    oc = duomo_config_to_openclip(get_model_config(cfg.model))
    torch.manual_seed(cfg.seed)
    model = open_clip.model.CLIP(
        oc["embed_dim"], oc["vision_cfg"], oc["text_cfg"], quick_gelu=oc["quick_gelu"]
    )
    image_size, context = oc["vision_cfg"]["image_size"], oc["text_cfg"]["context_length"]
    # open_clip_train's rule: no weight decay on gains, biases, logit_scale (ndim < 2 or those names)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": cfg.wd},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    loss_fn = ClipLoss()
    dataset = ShapesDataset(
        "train", size=cfg.data_size, image_size=image_size
    )  # as `duomo train --data shapes`
    collate = _OpenClipCollate(
        open_clip.image_transform(image_size, is_train=True),
        open_clip.get_tokenizer("ViT-B-32", context_length=context),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.workers,
        collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=cfg.workers > 0,
    )  # fmt: skip
    start = time.perf_counter()
    model.train()
    step = 0
    while step < cfg.steps:
        for pixels, tokens in loader:
            for group in optimizer.param_groups:
                group["lr"] = openclip_lr(step, cfg.lr, cfg.warmup, cfg.steps)
            image_features, text_features, logit_scale = model(pixels, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(cfg.max_logit_scale))
            step += 1
            if step == cfg.steps:
                break
    seconds = time.perf_counter() - start
    return OpenClipPipe(model, image_size, context), seconds


# ---- commands ---------------------------------------------------------------------------------------------

# Each row: the engine, and what it changes from the recipe (whose model is the plain ViT `shapes-tiny`, since
# open_clip has no conv stem), so "duomo" vs "open_clip" compares the engines alone.
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "open_clip": ("open_clip", {}),
    "duomo": ("duomo", {}),
    "duomo+conv": ("duomo", {"model": "shapes-tiny-conv"}),
    "duomo+conv+hn": ("duomo", {"model": "shapes-tiny-conv", "hard_negatives": 3}),
    "duomo+conv+LiT": ("duomo", {"model": "ViT-tiny-conv-MiniLM"}),
    "duomo+conv+hn-unrestricted": (
        "duomo",
        {"model": "shapes-tiny-conv", "hard_negatives": 3, "seen": False},
    ),
}
DEFAULT_ROWS = list(ROWS)[:5]


def run_row(
    row: str, seed: int, overrides: dict[str, Any], size: int, workdir: Path, path: Path = RECIPE
) -> dict[str, Any]:
    """Train one row with one seed and evaluate it."""
    if row not in ROWS:
        raise SystemExit(f"unknown row {row!r}; choose from {list(ROWS)}")
    engine, changes = ROWS[row]
    changes = dict(changes)
    restrict = changes.pop("seen", True)
    base = recipe(path, **{**changes, **overrides})
    out = str(workdir / f"{row}-{seed}")
    cfg = base.replace(seed=seed, out=out, quiet=True, plot=False, save_every=base.steps)
    if engine == "open_clip":
        pipe, seconds = train_openclip(cfg)
    elif restrict:
        pipe, seconds = train_duomo(cfg)
    else:  # NegCLIP swaps without the seen-word-pair restriction, to show what it protects against
        import duomo.train.run as run

        keep, run.negative_vocabulary = run.negative_vocabulary, lambda dataset: None
        try:
            pipe, seconds = train_duomo(cfg)
        finally:
            run.negative_vocabulary = keep
    metrics = evaluate_shapes(pipe, size)
    return {"row": row, "seed": seed, "model": cfg.model, "train_s": round(seconds, 1), "steps": cfg.steps,
            "hard_negatives": cfg.hard_negatives, **metrics}  # fmt: skip


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of every metric per row over seeds."""
    table = []
    for row in dict.fromkeys(r["row"] for r in results):
        runs = [r for r in results if r["row"] == row]
        keys = [k for k, v in runs[0].items() if isinstance(v, float) or k == "train_s"]
        table.append(
            {"row": row, "seeds": len(runs), **{k: statistics.median(r[k] for r in runs) for k in keys}}
        )
    return table


def print_table(table: list[dict[str, Any]]) -> None:
    """A markdown table of the medians."""
    cols = ["val_top1", "heldout_top1", "heldout-all_top1", "val_t2i_R@1", "heldout_t2i_R@1", "train_s"]
    print("| row | seeds | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in table:
        cells = [f"{r[c]:.3f}" if c != "train_s" else f"{r[c]:.0f}" for c in cols]
        print(f"| {r['row']} | {r['seeds']} | " + " | ".join(cells) + " |")


def cmd_bench(args: argparse.Namespace) -> None:
    """Train and evaluate every asked row for every seed; print medians, optionally write JSON."""
    overrides = json.loads(args.override) if args.override else {}
    if args.steps:
        overrides["steps"] = args.steps
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for row in args.rows:
                loads = [round(x, 2) for x in os.getloadavg()]
                result = run_row(
                    row, seed, overrides, args.size, Path(args.workdir or tmp), Path(args.recipe)
                )
                result["load_before"] = loads
                results.append(result)
                print(json.dumps(result), flush=True)
    table = summarise(results)
    print_table(table)
    if args.json:
        write_json(args.json, recipe(Path(args.recipe), **overrides).to_dict(), results, table)


def cmd_ship(args: argparse.Namespace) -> None:
    """Copy a run's final model into duomo/weights/<name>, with its prompt templates in the meta."""
    target = ship(args.run, Path(args.out or WEIGHTS), {"templates": list(SHAPES_TEMPLATES)}, half=True)
    print(json.dumps(evaluate_shapes(duomo.load(str(target), device="cpu"), args.size)))


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a saved model (duomo format or name)."""
    print(json.dumps(evaluate_shapes(duomo.load(args.model, device="cpu"), args.size)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="train and compare duomo, open_clip, duomo+hard negatives")
    b.add_argument("--recipe", default=str(RECIPE), help="training config JSON (default: the shipped recipe)")
    b.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    b.add_argument("--seeds", nargs="+", type=int, default=[0])
    b.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    b.add_argument("--override", default=None, help='JSON of other recipe fields, e.g. {"lr": 2e-3}')
    b.add_argument("--size", type=int, default=1000, help="evaluation samples per split")
    b.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    b.add_argument("--json", default=None, help="write runs and medians here")
    b.set_defaults(func=cmd_bench)
    s = sub.add_parser("ship", help="write a run's model into duomo/weights (fp16, with prompt templates)")
    s.add_argument("run", help="run folder of `duomo train` (or its model/ folder)")
    s.add_argument("--out", default=None, help=f"default {WEIGHTS.relative_to(ROOT)}")
    s.add_argument("--size", type=int, default=1000)
    s.set_defaults(func=cmd_ship)
    e = sub.add_parser("eval", help="zero-shot and retrieval of a saved model on shapes val/heldout")
    e.add_argument("model")
    e.add_argument("--size", type=int, default=1000)
    e.set_defaults(func=cmd_eval)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
