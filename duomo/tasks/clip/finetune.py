"""Fine-tuning on a little labelled data: the CLIP image tower plus a linear head, trained with cross-entropy.

The head starts as the zero-shot text classifier (WiSE-FT's initialisation), so epoch 0 is exactly zero-shot
CLIP and training only has to improve on it. Three modes:

- "probe": the image tower stays frozen; only the head trains (on features computed once);
- "full":  the image tower and the head train;
- "lora":  low-rank adapters on the image tower's attention projections and the head train; the adapters are
  merged into plain weights at the end.

`wise_alpha` (WiSE-FT) interpolates the weights: (1 - alpha) * zero-shot + alpha * fine-tuned.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from duomo.errors import InputError
from duomo.nn.lora import apply_lora, merge_lora
from duomo.tasks.clip.evaluate import EvalCollate, classification_metrics
from duomo.tasks.clip.probe import stratified_split
from duomo.tasks.clip.zero_shot import DEFAULT_TEMPLATES, build_classifier
from duomo.train.config import TrainConfig
from duomo.train.data import map_loader_factory
from duomo.train.distributed import DistInfo
from duomo.train.objectives.clip import ClassifierObjective
from duomo.train.trainer import Trainer

log = logging.getLogger("duomo.finetune")

MODES: tuple[str, ...] = ("probe", "full", "lora")
DEFAULT_LR: dict[str, float] = {"probe": 1e-3, "full": 1e-5, "lora": 1e-4}
HEAD_FILE = "classifier.safetensors"


@dataclass
class FinetuneConfig:
    """How to fine-tune; `lr` is the image tower's rate (the head's in probe mode), by mode: DEFAULT_LR."""

    mode: str = "full"
    epochs: int = 10
    lr: float | None = None
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    warmup_fraction: float = 0.1
    val_fraction: float = 0.2
    lora_rank: int = 8
    lora_alpha: float = 16.0
    wise_alpha: float | None = None
    augment: bool = True
    templates: list[str] | None = None
    seed: int = 0
    workers: int = 0

    def check(self) -> None:
        """Raise InputError naming the first bad setting."""
        problems = [
            (self.mode not in MODES, f"mode must be one of {list(MODES)}, not {self.mode!r}"),
            (self.epochs < 1 or self.batch_size < 1, "epochs and batch_size must be >= 1"),
            (not 0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.wise_alpha is not None and not 0 <= self.wise_alpha <= 1, "wise_alpha must be in [0, 1]"),
            (self.lora_rank < 1, f"lora_rank must be >= 1, got {self.lora_rank}"),
        ]
        for bad, message in problems:
            if bad:
                raise InputError(message)


class ImageClassifier(nn.Module):
    """A CLIP image tower and a linear head over its L2-normalised embeddings, times a fixed logit scale."""

    def __init__(self, visual: nn.Module, head: nn.Linear, scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.head = head
        self.register_buffer("scale", torch.tensor(float(scale)))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings [B, D]."""
        return F.normalize(self.visual(pixels), dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] of preprocessed pixels [B, 3, H, W]."""
        return self.scale * self.head(self.features(pixels))


def zero_shot_head(pipe: Any, classes: Sequence[str], templates: Sequence[str]) -> tuple[nn.Linear, float]:
    """(head whose rows are the prompt-ensembled class text embeddings, the model's logit scale)."""
    try:
        weight = build_classifier(list(classes), list(templates), pipe.encode_text)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    return head, float(pipe.model.logit_scale.detach().exp().clamp(max=100))


@dataclass
class FinetuneResult:
    """The fine-tuned classifier and how it got there: per-epoch history, validation before and after."""

    model: ImageClassifier
    classes: list[str]
    templates: list[str]
    config: FinetuneConfig
    before: dict[str, float]  # zero-shot, on the validation images
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready record of the run."""
        return {
            "mode": self.config.mode,
            "classes": self.classes,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "before": self.before,
            "after": self.after,
            "history": self.history,
            "config": asdict(self.config),
        }


def open_labelled(
    spec: str | os.PathLike, size: int | None = None, image_size: int = 64, seed: int = 0
) -> Dataset:
    """A dataset with `classes`: an ImageFolder (root/class/*.jpg), a labelled manifest, or a built-in."""
    from duomo.data.catalog import BUILTINS, builtin_dataset, open_pairs
    from duomo.data.pairs import ImageFolderDataset
    from duomo.tasks.clip.evaluate import is_image_folder, limit

    text = os.fspath(spec)
    name, _, split = text.partition(":")
    if name in BUILTINS:
        dataset: Any = builtin_dataset(
            name, split=split or "train", size=size or 2000, image_size=image_size, seed=seed
        )
    elif Path(text).expanduser().is_dir() and is_image_folder(Path(text).expanduser()):
        dataset = ImageFolderDataset(Path(text).expanduser(), seed=seed)
    else:
        dataset = open_pairs(text)
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise InputError(
            f"{text!r} has no class names; fine-tuning needs an ImageFolder (root/class_name/*.jpg)"
        )
    limited = limit(dataset, size) if name not in BUILTINS else dataset
    limited.classes = list(classes)
    return limited


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Integer labels of a map-style dataset (-1: none), from its records when it has them (no decoding)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    records = getattr(dataset, "records", None)
    if records is not None:
        return torch.tensor([-1 if r.label is None else int(r.label) for r in records])
    labels = []
    for i in range(len(dataset)):
        label = dataset[i].get("label")
        labels.append(-1 if label is None else int(label))
    return torch.tensor(labels)


def _loader(
    dataset: Dataset, transform: Callable, batch_size: int, shuffle: bool, seed: int, workers: int
) -> Any:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=EvalCollate(transform),
        generator=torch.Generator().manual_seed(seed),
    )


@torch.no_grad()
def predict(model: nn.Module, batches: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], labels [N]) of a model over (inputs, labels, ...) batches."""
    model.eval()
    logits, labels = [], []
    for inputs, batch_labels, *_ in batches:
        logits.append(model(inputs.to(device)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def _interpolate(start: dict[str, torch.Tensor], model: nn.Module, alpha: float) -> None:
    """WiSE-FT: set every float tensor of `model` to (1 - alpha) * start + alpha * current."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point() and key in start:
                value.copy_((1 - alpha) * start[key].to(value) + alpha * value)


def finetune(
    pipe: Any,
    dataset: Dataset,
    cfg: FinetuneConfig | None = None,
    val_dataset: Dataset | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a classifier on a labelled dataset with `classes` (ImageFolder); `pipe` is left unchanged."""
    cfg = cfg or FinetuneConfig()
    cfg.check()
    cuda = [pipe.device.index or 0] if pipe.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeded and reproducible, without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        return _finetune(pipe, dataset, cfg, val_dataset, on_epoch)


def _finetune(
    pipe: Any,
    dataset: Dataset,
    cfg: FinetuneConfig,
    val_dataset: Dataset | None,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> FinetuneResult:
    """The body of `finetune`, under its seeded RNG."""
    classes = list(getattr(dataset, "classes", None) or [])
    if not classes:
        raise InputError(
            "fine-tuning needs a labelled dataset with class names (an ImageFolder: root/class/*.jpg)"
        )
    labels = dataset_labels(dataset)
    labelled = torch.nonzero(labels >= 0).flatten()
    if val_dataset is None:
        train_pos, val_pos = stratified_split(labels[labelled], cfg.val_fraction, cfg.seed)
        train_set: Dataset = Subset(dataset, labelled[train_pos].tolist())
        val_set: Dataset | None = Subset(dataset, labelled[val_pos].tolist()) if len(val_pos) else None
    else:
        train_set, val_set = Subset(dataset, labelled.tolist()), val_dataset
    if len(train_set) == 0:
        raise InputError("no labelled training images")

    device = pipe.device
    templates = list(cfg.templates or pipe.meta.get("templates") or DEFAULT_TEMPLATES)
    head, scale = zero_shot_head(pipe, classes, templates)
    visual = copy.deepcopy(pipe.model.visual).float()
    model = ImageClassifier(visual, head, scale).to(device)
    start = (
        {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.wise_alpha is not None else {}
    )

    vision = pipe.config.vision
    from duomo.data.transforms import image_transform

    eval_tf = image_transform(vision.image_size, vision.mean, vision.std)
    train_tf = image_transform(vision.image_size, vision.mean, vision.std, train=cfg.augment)
    val_batches = _loader(val_set, eval_tf, 64, False, cfg.seed, cfg.workers) if val_set is not None else None

    def validate() -> dict[str, float]:
        if val_batches is None:
            return {}
        logits, y = predict(model, val_batches, device)
        return classification_metrics(logits, y)

    before = validate()
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.mode]
    if cfg.mode == "probe":  # the frozen tower runs once per image, not once per epoch
        batches = _loader(train_set, eval_tf, 64, False, cfg.seed, cfg.workers)
        data: Dataset = _FeatureRows(*predict(_Features(model), batches, device))
    else:
        if cfg.mode == "lora":
            apply_lora(model.visual, cfg.lora_rank, cfg.lora_alpha)
            model.to(device)
        data = _ImageRows(train_set, train_tf)
    per_epoch = len(data) // cfg.batch_size
    if per_epoch < 1:
        raise InputError(f"{len(data)} training images are fewer than one batch of {cfg.batch_size}")
    history: list[dict[str, float]] = []
    losses: list[float] = []

    def end_of_epoch(step: int, stats: dict[str, float]) -> None:
        losses.append(stats["loss"])
        if step % per_epoch:
            return
        record = {"epoch": step // per_epoch, "loss": sum(losses) / len(losses)}
        losses.clear()
        record.update({f"val_{k}": v for k, v in validate().items()})
        model.train()
        if cfg.mode == "probe":
            model.visual.eval()  # frozen: as pretrained
        history.append(record)
        log.info("epoch %d: %s", record["epoch"], record)
        if on_epoch is not None:
            on_epoch(record)

    with tempfile.TemporaryDirectory(prefix="duomo-finetune-") as out:
        train = TrainConfig(
            steps=cfg.epochs * per_epoch,
            batch_size=cfg.batch_size,
            lr=lr,
            wd=cfg.weight_decay,
            beta2=0.999,
            eps=1e-8,
            grad_clip=None,
            schedule="cosine",
            warmup=max(1, int(cfg.warmup_fraction * cfg.epochs * per_epoch)),
            seed=cfg.seed,
            head_lr_weight=1.0 if cfg.mode == "probe" else cfg.head_lr / lr,
            workers=cfg.workers,
            out=out,
            save_every=cfg.epochs * per_epoch,
            log_every=per_epoch,
            quiet=True,
            plot=False,
            device=str(device),
        )
        trainer = Trainer(
            model,
            ClassifierObjective(features=cfg.mode == "probe"),
            map_loader_factory(data, cfg.batch_size, workers=cfg.workers, seed=cfg.seed),
            train,
            DistInfo(device=device),
            freeze=["visual"] if cfg.mode == "probe" else [],
            body="visual.",
            export=lambda m, folder: folder,
            on_step=end_of_epoch,
        )
        trainer.fit()

    if cfg.mode == "lora":
        merge_lora(model.visual)
    if cfg.wise_alpha is not None:
        _interpolate(start, model, cfg.wise_alpha)
    model.requires_grad_(False)
    model.eval()
    n_val = len(val_set) if val_set is not None else 0
    after = validate()
    return FinetuneResult(model, classes, templates, cfg, before, after, history, len(train_set), n_val)


class _FeatureRows(Dataset):
    """Precomputed tower outputs with their labels, as trainer rows {"features", "labels"}."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "labels": self.labels[index]}


class _ImageRows(Dataset):
    """Labelled images, transformed (augmented) as they are read, as trainer rows {"pixels", "labels"}."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index]
        return {"pixels": self.transform(sample["image"]), "labels": torch.tensor(int(sample["label"]))}


class _Features(nn.Module):
    """The normalised image embeddings of a classifier (its head left out)."""

    def __init__(self, classifier: ImageClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(pixels)


# ---- saving and loading ----


def save_finetuned(result: FinetuneResult, pipe: Any, directory: str | os.PathLike) -> Path:
    """Write a duomo checkpoint (the CLIP model with the fine-tuned image tower) plus the head beside it."""
    from duomo.io import save_native
    from duomo.io.files import save_safetensors
    from duomo.models import CLIP

    base = pipe.model
    clip = CLIP(
        copy.deepcopy(result.model.visual).to(next(base.parameters()).dtype),
        base.text,
        float(base.logit_scale.detach()),
        None if base.logit_bias is None else float(base.logit_bias.detach()),
        config=base.config,
    )
    meta = dict(pipe.meta or {})
    meta.update({"classes": result.classes, "templates": result.templates, "finetune": result.summary()})
    directory = save_native(clip, directory, meta=meta)
    head = result.model.head
    save_safetensors(
        {
            "weight": head.weight.detach().float().cpu().contiguous(),
            "bias": head.bias.detach().float().cpu(),
            "scale": result.model.scale.detach().float().cpu().reshape(1),
        },
        Path(directory) / HEAD_FILE,
        {"classes": "\n".join(result.classes)},
    )
    return Path(directory)
