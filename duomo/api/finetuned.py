"""A fine-tuned CLIP classifier read back with its pipeline: what `duomo finetune` wrote, ready to predict."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duomo.errors import CheckpointError
from duomo.tasks.clip.finetune import HEAD_FILE, ImageClassifier


@dataclass
class FinetunedClassifier:
    """A saved fine-tuned classifier: the pipeline (preprocessing, embeddings) and its trained head."""

    pipeline: Any
    model: ImageClassifier
    classes: list[str]

    @torch.no_grad()
    def predict_proba(self, images: Any) -> torch.Tensor:
        """Class probabilities [N, C] of images (paths, PIL images, bytes or preprocessed tensors)."""
        items = images if isinstance(images, list | tuple) else [images]
        pixels = torch.stack([self.pipeline.preprocess(img) for img in items]).to(self.pipeline.device)
        return self.model(pixels.to(next(self.model.parameters()).dtype)).float().softmax(dim=-1).cpu()


def load_finetuned(directory: str | os.PathLike, device: str | torch.device = "cpu") -> FinetunedClassifier:
    """Read back what `save_finetuned` wrote."""
    from duomo.api import Pipeline
    from duomo.io import load_into, load_native
    from duomo.io.files import load_weights
    from duomo.io.text_towers import restore_package_weights
    from duomo.models import create_model

    directory = Path(directory)
    if not (directory / HEAD_FILE).is_file():
        raise CheckpointError(f"{directory} has no {HEAD_FILE}: it was not written by `duomo finetune`")
    config, state, meta = load_native(directory)
    model = create_model(config)
    load_into(model, restore_package_weights(config.text, state, meta))
    pipe = Pipeline(model.to(device), device, name=str(directory), meta=meta)
    head_state = load_weights(directory / HEAD_FILE)
    weight = head_state["weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": head_state["bias"]})
    classifier = ImageClassifier(model.visual, head, float(head_state["scale"][0])).to(device).eval()
    classes = list(meta.get("classes") or [str(i) for i in range(weight.shape[0])])
    return FinetunedClassifier(pipe, classifier, classes)
