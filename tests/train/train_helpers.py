"""A tiny world for trainer tests: colour squares captioned by colour, a word tokenizer, a small CLIP."""

from __future__ import annotations

import random

import torch
from PIL import Image
from torch.utils.data import Dataset

from duomo.models import CLIP, CLIPConfig, TextConfig, VisionConfig, create_model
from duomo.train.config import TrainConfig
from duomo.train.data import pair_loader_factory
from duomo.train.distributed import DistInfo
from duomo.train.losses import build_loss
from duomo.train.objectives.clip import ContrastiveObjective
from duomo.train.trainer import Trainer

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (130, 40, 190),
    "cyan": (20, 200, 210),
    "orange": (245, 130, 20),
    "pink": (245, 120, 185),
}
VOCAB = ["<pad>", "<unk>"] + sorted({w for c in COLOURS for w in f"a {c} square circle".split()}) + ["<sot>"]
CONTEXT = 8


def tiny_config(vocab_size: int = 64) -> CLIPConfig:
    """A one-block CLIP small enough to train in seconds on a CPU."""
    return CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(
            image_size=16, patch_size=8, width=32, layers=1, heads=2, mean=(0.5,) * 3, std=(0.25,) * 3
        ),
        text=TextConfig(
            vocab_size=vocab_size, context_length=CONTEXT, width=32, layers=1, heads=2, eos_token_id=63
        ),
    )


def tiny_model(seed: int = 0) -> CLIP:
    """The tiny CLIP with weights fixed by `seed`."""
    torch.manual_seed(seed)
    return create_model(tiny_config())


class WordTokenizer:
    """Whitespace tokenizer over VOCAB in CLIP's layout: <sot> words <eot> padding (eot = highest id)."""

    ids = {w: i for i, w in enumerate(VOCAB)}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [self.ids.get(w, 1) for w in text.replace(".", "").split()]
            ids = [self.ids["<sot>"]] + words[: CONTEXT - 2]
            ids.append(63)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class ColourSquares(Dataset):
    """`n` noisy squares of 8 colours, captioned "a <colour> square"; sample i is fixed by i."""

    classes = list(COLOURS)

    def __init__(self, n: int = 64, size: int = 16) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(index)
        label = index % len(COLOURS)
        name = self.classes[label]
        rgb = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[name])
        img = Image.new("RGB", (self.size, self.size), tuple(rng.randint(90, 160) for _ in range(3)))
        lo, hi = rng.randint(0, 4), rng.randint(11, 15)
        img.paste(rgb, (lo, lo, hi, hi))
        return {"image": img, "text": f"a {name} square", "label": label, "key": f"sq-{index}"}


def identity_transform(size: int = 16, train: bool = True):
    """duomo's image transform at the tiny model's size (train mode: random resized crops)."""
    from duomo.data.transforms import image_transform

    return image_transform(size, mean=(0.5,) * 3, std=(0.25,) * 3, train=train)


def make_trainer(
    tmp_path,
    model: CLIP | None = None,
    dataset: Dataset | None = None,
    loss: str = "clip",
    objective: ContrastiveObjective | None = None,
    info: DistInfo | None = None,
    **overrides,
) -> Trainer:
    """A Trainer on ColourSquares with quiet, CPU, fp32, worker-less defaults; fields overridable."""
    fields = {
        "steps": 6,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup": 2,
        "wd": 0.1,
        "out": str(tmp_path),
        "workers": 0,
        "quiet": True,
        "log_every": 1,
        "save_every": 1000,
        "device": "cpu",
        "loss": loss,
        "plot": False,
    }
    fields.update(overrides)
    cfg = TrainConfig(**fields)
    model = model if model is not None else tiny_model()
    if loss == "siglip" and model.logit_bias is None:
        model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    loaders = pair_loader_factory(
        dataset if dataset is not None else ColourSquares(),
        identity_transform(),
        WordTokenizer(),
        cfg.batch_size,
        rank=info.rank if info else 0,
        world_size=info.world_size if info else 1,
        workers=cfg.workers,
        seed=cfg.seed,
        hard_negatives=cfg.hard_negatives,
    )
    objective = objective or ContrastiveObjective(build_loss(cfg.loss, cfg.local_loss, cfg.gather_with_grad))
    return Trainer(model, objective, loaders, cfg, info)
