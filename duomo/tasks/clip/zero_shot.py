"""Zero-shot classification: class names -> prompt-ensembled text classifier -> image scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
)


def expand_templates(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every label, label-major: [l0t0, l0t1, ..., l1t0, ...]."""
    for t in templates:
        if "{}" not in t and "{label}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' placeholder for the label")
    return [t.replace("{label}", "{}").format(label) for label in labels for t in templates]


def build_classifier(
    labels: Sequence[str], templates: Sequence[str], encode_text: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """One unit vector per label: the renormalised mean of its prompts' normalised text embeddings."""
    prompts = expand_templates(labels, templates)
    emb = F.normalize(encode_text(prompts).float(), dim=-1)
    emb = emb.view(len(labels), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def classify(
    image_embeds: torch.Tensor, classifier: torch.Tensor, logit_scale: float = 100.0
) -> torch.Tensor:
    """Softmax probabilities [N_images, N_labels] from normalised image embeddings and a classifier."""
    return (logit_scale * image_embeds.float() @ classifier.T).softmax(dim=-1)
