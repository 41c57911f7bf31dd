"""BEiT-3 as a dual encoder: contrastive fine-tuning for image<->text retrieval (unilm's BEiT3ForRetrieval).

Images and texts go through the one backbone separately (vision-only and language-only modes: every token
takes its own modality's experts); the first token of each, through `vision_head` / `language_head` and
L2-normalised, is the embedding. Fine-tuning minimises CLIP's contrastive loss with a learned temperature
(`duomo.train.losses.ClipLoss`, unilm's criterion is OpenCLIP's). Evaluation: recall@1/5/10 both ways on a
shapes split (`duomo.tasks.metrics.retrieval_metrics`), one caption per image.
"""

from __future__ import annotations

import torch

from duomo.models.beit3 import BEiT3ForRetrieval
from duomo.tasks.beit3.data import TaskTable
from duomo.tasks.metrics import retrieval_metrics

TASK = "retrieval"


@torch.no_grad()
def evaluate_retrieval(model: BEiT3ForRetrieval, data: TaskTable, batch_size: int = 128) -> dict[str, float]:
    """Recall@1/5/10 image->text and text->image over a caption table's images and captions."""
    model.eval()
    device = next(model.parameters()).device
    chunks = range(0, len(data.pixels), batch_size)
    images = torch.cat([model.encode_image(data.pixels[s : s + batch_size].to(device)).cpu() for s in chunks])
    texts = []
    for start in range(0, len(data), batch_size):
        b = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        texts.append(model.encode_text(b["tokens"].to(device), b["padding_mask"].to(device)).cpu())
    similarity = images @ torch.cat(texts).T  # [images, captions]
    return {**retrieval_metrics(similarity, data.image_index), "images": float(len(data.pixels))}
