"""Next-token prediction for (multimodal) language models: cross-entropy on the positions that have labels
(the assistant's tokens), the head applied only there (a 49k-word head over every prompt token is most of a
small LM's cost)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duomo.train.trainer import Batch

IGNORE = -100


class NextTokenObjective:
    """batch {"ids" [B, T], "labels" [B, T] (-100: not learned), "mask" [B, T], "images" [N, 3, H, W]}
    -> {"loss", "tokens"}: the mean cross-entropy of predicting each labelled token from what precedes it."""

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        targets = labels[:, 1:]
        select = torch.zeros_like(labels, dtype=torch.bool)
        select[:, :-1] = targets != IGNORE  # position t predicts token t + 1
        images = batch["images"] if batch["images"].shape[0] else None
        logits = model(batch["ids"], images, batch["mask"], select=select)  # [n_selected, vocab]
        wanted = targets[targets != IGNORE]
        loss = F.cross_entropy(logits.float(), wanted)
        return {"loss": loss, "tokens": torch.tensor(float(wanted.numel()))}
