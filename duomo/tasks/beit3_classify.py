"""BEiT-3 image classification on the shapes world (unilm's BEiT3ForImageClassification head).

Labels are one attribute of the main object: its shape (default), its colour, or the colour+shape pair.
Shape and colour classes all occur in training, so the held-out split (colour+shape pairs never seen
together) tests whether the classifier reads the attribute rather than the pair; "pair" classes are the seen
pairs, evaluated on val only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duomo.data.shapes import COLOURS, SHAPES, ShapesDataset, class_names
from duomo.errors import InputError
from duomo.models.beit3 import BEiT3, BEiT3Config, BEiT3ForImageClassification
from duomo.train.mdm import load_task_weights, read_task_config, save_task_folder, shapes_pixels, train_steps

TASK = "classify"
LABELS = ("shape", "colour", "pair")


def label_names(label: str) -> list[str]:
    """The class names of a label kind."""
    if label == "shape":
        return list(SHAPES)
    if label == "colour":
        return list(COLOURS)
    if label == "pair":
        return class_names("train")
    raise InputError(f"unknown label {label!r}; choose one of {', '.join(LABELS)}")


class ShapesClassification:
    """Images of a shapes split, normalised once, with the class index of their main object's `label`."""

    def __init__(self, split: str, size: int, cfg: BEiT3Config, label: str = "shape", seed: int = 0) -> None:
        names = label_names(label)
        if label == "pair" and split == "heldout":
            raise InputError("held-out images show pairs that are no class of a 'pair' classifier; use val")
        ds = ShapesDataset(split, size=size, image_size=cfg.image_size, seed=seed, max_objects=2)
        samples = [ds[i] for i in range(size)]
        self.pixels = shapes_pixels(samples, cfg.image_size, cfg.mean, cfg.std)
        main = [ds.scene(i).main for i in range(size)]
        keys = {
            "shape": [m.shape for m in main],
            "colour": [m.colour for m in main],
            "pair": [m.name for m in main],
        }
        index = {n: i for i, n in enumerate(names)}
        self.labels = torch.tensor([index[k] for k in keys[label]])

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, seed: int = 0):  # noqa: ANN201 - an endless iterator of dicts
        """Endless shuffled batches of "pixels" and "labels"."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=gen)
            for start in range(0, len(self) - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                yield {"pixels": self.pixels[idx], "labels": self.labels[idx]}


class ClassifyModel(BEiT3ForImageClassification):
    """`BEiT3ForImageClassification` that knows its label kind and class names."""

    def __init__(self, backbone: BEiT3, label: str = "shape") -> None:
        classes = label_names(label)
        super().__init__(backbone, len(classes))
        self.label, self.classes = label, classes


def classify_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy and accuracy of one batch."""
    logits = model(batch["pixels"])
    loss = F.cross_entropy(logits.float(), batch["labels"])
    return {"loss": loss, "acc": (logits.argmax(-1) == batch["labels"]).float().mean()}


def finetune_classify(
    model: ClassifyModel,
    train: ShapesClassification,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Fine-tune for `steps` AdamW steps."""
    torch.manual_seed(seed)
    batches = train.batches(batch_size, seed)
    return train_steps(model, classify_objective, batches, steps, lr, warmup=steps // 10, log_every=log_every)


@torch.no_grad()
def evaluate_classify(
    model: ClassifyModel, data: ShapesClassification, batch_size: int = 128
) -> dict[str, float]:
    """Top-1 accuracy, and the majority-class baseline of the split."""
    model.eval()
    preds = torch.cat(
        [model(data.pixels[s : s + batch_size]).argmax(-1) for s in range(0, len(data), batch_size)]
    )
    majority = float(torch.bincount(data.labels).max()) / max(1, len(data))
    return {"accuracy": float((preds == data.labels).float().mean()), "majority_baseline": majority}


@torch.no_grad()
def classify_image(model: ClassifyModel, image: object) -> tuple[str, float]:
    """The best class of one image (path, bytes, PIL...) and its softmax probability."""
    from duomo.data.transforms import image_transform, preprocess_images

    cfg = model.beit3.cfg
    pixels = preprocess_images([image], image_transform(cfg.image_size, cfg.mean, cfg.std))
    probs = model.eval()(pixels.to(next(model.parameters()).device)).softmax(-1)[0]
    best = int(probs.argmax())
    return model.classes[best], float(probs[best])


def save_classify(model: ClassifyModel, path: str | Path) -> Path:
    """Write config.json (task, backbone config, label kind, its CLIP start) and model.safetensors."""
    return save_task_folder(model, path, TASK, label=model.label)


def load_classify(path: str | Path) -> ClassifyModel:
    """A classifier saved with `save_classify`, in eval mode."""
    path = Path(path)
    data = read_task_config(path, TASK)
    model = ClassifyModel(BEiT3(BEiT3Config.from_dict(data["beit3"])), data.get("label", "shape"))
    load_task_weights(model, path, data)
    return model.eval()
