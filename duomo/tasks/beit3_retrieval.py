"""BEiT-3 as a dual encoder: contrastive fine-tuning for image<->text retrieval (unilm's BEiT3ForRetrieval).

Images and texts go through the one backbone separately (vision-only and language-only modes: every token
takes its own modality's experts); the first token of each, through `vision_head` / `language_head` and
L2-normalised, is the embedding. Fine-tuning minimises CLIP's contrastive loss with a learned temperature
(`duomo.train.losses.ClipLoss`, unilm's criterion is OpenCLIP's). Evaluation: recall@1/5/10 both ways on a
shapes split (`duomo.tasks.retrieval.retrieval_metrics`), one caption per image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from duomo.models.beit3 import BEiT3, BEiT3Config, BEiT3ForRetrieval
from duomo.tasks.caption import ShapesCaptions
from duomo.train.losses import ClipLoss
from duomo.train.mdm import load_task_weights, read_task_config, save_task_folder, train_steps

TASK = "retrieval"


class RetrievalObjective:
    """Contrastive loss of a batch of "pixels", "tokens", "padding_mask" (image i matches caption i)."""

    def __init__(self) -> None:
        self.loss = ClipLoss()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss", "acc"}: acc is how often an image's nearest caption in the batch is its own."""
        inner: BEiT3ForRetrieval = getattr(model, "module", model)
        images = inner.encode_image(batch["pixels"])
        texts = inner.encode_text(batch["tokens"], batch["padding_mask"])
        loss = self.loss(images, texts, inner.logit_scale.exp().clamp(max=100))
        right = torch.arange(images.shape[0], device=images.device)
        return {"loss": loss, "acc": ((images @ texts.T).argmax(-1) == right).float().mean()}


def finetune_retrieval(
    model: BEiT3ForRetrieval,
    train: ShapesCaptions,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Contrastive fine-tuning for `steps` AdamW steps on shapes image-caption pairs."""
    torch.manual_seed(seed)
    batches = train.batches(batch_size, seed)
    return train_steps(
        model, RetrievalObjective(), batches, steps, lr, warmup=steps // 10, log_every=log_every
    )


@torch.no_grad()
def evaluate_retrieval(
    model: BEiT3ForRetrieval, data: ShapesCaptions, batch_size: int = 128
) -> dict[str, float]:
    """Recall@1/5/10 image->text and text->image over a split's images and their captions."""
    from duomo.tasks.retrieval import retrieval_metrics

    model.eval()
    images, texts = [], []
    for start in range(0, len(data), batch_size):
        stop = start + batch_size
        images.append(model.encode_image(data.pixels[start:stop]))
        pad = data.padding[start:stop]
        length = int((~pad).sum(1).max())
        texts.append(model.encode_text(data.ids[start:stop, :length], pad[:, :length]))
    similarity = torch.cat(images) @ torch.cat(texts).T
    return {**retrieval_metrics(similarity, torch.arange(len(data))), "images": float(len(data))}


def save_retrieval(model: BEiT3ForRetrieval, path: str | Path) -> Path:
    """Write config.json (task, backbone config, its CLIP start) and model.safetensors to folder `path`."""
    return save_task_folder(model, path, TASK)


def load_retrieval(path: str | Path) -> BEiT3ForRetrieval:
    """A retrieval model saved with `save_retrieval`, in eval mode."""
    path = Path(path)
    data = read_task_config(path, TASK)
    model = BEiT3ForRetrieval(BEiT3(BEiT3Config.from_dict(data["beit3"])))
    load_task_weights(model, path, data)
    return model.eval()
