"""BEiT-3 image classification (unilm's BEiT3ForImageClassification head): evaluation and one image.

Labels come from an ImageFolder tree, an `image,label` manifest, or the shapes world (the main object's
shape, colour or colour+shape pair; shape and colour classes all occur in training, so the held-out split,
pairs never seen together, tests whether the classifier reads the attribute rather than the pair).
"""

from __future__ import annotations

import torch

from duomo.data.images import ImageLike
from duomo.data.transforms import image_transform, preprocess_images
from duomo.models.beit3 import ClassifyModel
from duomo.tasks.beit3.data import TaskTable

TASK = "classify"


@torch.no_grad()
def evaluate_classify(model: ClassifyModel, data: TaskTable, batch_size: int = 128) -> dict[str, float]:
    """Top-1 accuracy, and the majority-class baseline of the split."""
    model.eval()
    device = next(model.parameters()).device
    labels = data.columns["labels"]
    preds = torch.cat(
        [
            model(data.pixels[data.image_index[s : s + batch_size]].to(device)).argmax(-1).cpu()
            for s in range(0, len(data), batch_size)
        ]
    )
    majority = float(torch.bincount(labels).max()) / max(1, len(data))
    return {"accuracy": float((preds == labels).float().mean()), "majority_baseline": majority}


@torch.no_grad()
def classify_image(model: ClassifyModel, image: ImageLike, top_k: int = 1) -> list[tuple[str, float]]:
    """The `top_k` classes of one image (path, bytes, PIL...) with their softmax probabilities."""
    cfg = model.beit3.cfg
    pixels = preprocess_images([image], image_transform(cfg.image_size, cfg.mean, cfg.std))
    probs = model.eval()(pixels.to(next(model.parameters()).device)).softmax(-1)[0].cpu()
    top = probs.topk(min(top_k, len(model.classes)))
    return [
        (model.classes[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
