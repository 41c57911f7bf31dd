"""Image<->text retrieval recall at K, as the CLIP paper defines it.

image -> text: an image scores a hit at K when ANY of its captions is among the K texts most similar to it.
text -> image: a caption scores a hit at K when its one image is among the K images most similar to it.
Equal scores are ranked in dataset order (a stable sort), so the numbers are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _first_hit(scores: torch.Tensor, correct: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each query row of scores [Q, N], the 0-based rank of its best-placed correct item (mask [Q, N])."""
    ranks = []
    for start in range(0, scores.shape[0], chunk):
        order = torch.argsort(scores[start : start + chunk], dim=1, descending=True, stable=True)
        hits = torch.gather(correct[start : start + chunk], 1, order)
        ranks.append(hits.float().argmax(dim=1))  # the first True; rows are checked to hold one
    return torch.cat(ranks)


def image_to_text_ranks(similarity: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """Rank [N_images] of each image's best-placed caption among all texts (images without captions: -1)."""
    n_images = similarity.shape[0]
    correct = text_image[None, :] == torch.arange(n_images)[:, None]  # [N_images, N_texts]
    ranks = _first_hit(similarity, correct)
    return torch.where(correct.any(dim=1), ranks, torch.full_like(ranks, -1))


def text_to_image_ranks(similarity: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """Rank [N_texts] of each caption's image among all images."""
    n_images = similarity.shape[0]
    correct = torch.arange(n_images)[None, :] == text_image[:, None]  # [N_texts, N_images]
    return _first_hit(similarity.T, correct)


def retrieval_metrics(
    similarity: torch.Tensor, text_image: torch.Tensor | Sequence[int], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """i2t_R@K and t2i_R@K for each K, and their mean, from similarities [N_images, N_texts].

    `text_image[j]` is the image (row) that caption j (column) describes; an image may have many captions.
    """
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    similarity = similarity.float()
    if similarity.shape[1] != len(text_image):
        raise ValueError(f"{similarity.shape[1]} text columns but {len(text_image)} caption-to-image entries")
    i2t = image_to_text_ranks(similarity, text_image)
    i2t = i2t[i2t >= 0]
    t2i = text_to_image_ranks(similarity, text_image)
    metrics = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = float((i2t < k).float().mean())
    for k in ks:
        metrics[f"t2i_R@{k}"] = float((t2i < k).float().mean())
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics
