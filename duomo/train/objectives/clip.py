"""The CLIP family's objective: contrastive (CLIP / SigLIP) loss of a dual encoder, with hard negatives."""

from __future__ import annotations

import torch
from torch import nn

from duomo.train.data import Batch


class ContrastiveObjective:
    """A dual encoder's `model(pixels, tokens)` embeddings scored by a contrastive loss (Clip/SigLipLoss).

    Batches hold "pixels" and "tokens", and optionally "neg_tokens" [B, n, T] (hard-negative captions), which
    are encoded in the same forward call (one call per step keeps DDP's bookkeeping simple).
    """

    def __init__(self, loss: nn.Module) -> None:
        self.loss_fn = loss

    def embed(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Model outputs: per-row embeddings ([B, D], [B * n, D]) and shared 0-d scalars (scale, bias)."""
        tokens, neg = batch["tokens"], batch.get("neg_tokens")
        b = tokens.shape[0]
        if neg is not None:
            tokens = torch.cat([tokens, neg.reshape(-1, neg.shape[-1])])
        out = model(batch["pixels"], tokens)
        feats = {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"][:b]}
        if neg is not None:
            feats["neg_text_embeds"] = out["text_embeds"][b:]
        feats["logit_scale"] = out["logit_scale"]
        if out.get("logit_bias") is not None:
            feats["logit_bias"] = out["logit_bias"]
        return feats

    def loss(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The contrastive loss of (possibly concatenated) embeddings."""
        loss = self.loss_fn(
            feats["image_embeds"],
            feats["text_embeds"],
            feats["logit_scale"],
            feats.get("logit_bias"),
            feats.get("neg_text_embeds"),
        )
        return {"loss": loss}

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return self.loss(self.embed(model, batch))


class ClassifierObjective:
    """Cross-entropy of an image classifier (`ImageClassifier`: a tower and a scaled linear head) on a batch
    of "pixels" and "labels", or, with `features=True`, of precomputed tower outputs in "features" (a linear
    probe: the frozen tower runs once per image, not once per epoch)."""

    def __init__(self, features: bool = False) -> None:
        self.features = features

    def __call__(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """{"loss", "acc"} of one batch."""
        inner = getattr(model, "module", model)
        logits = inner.scale * inner.head(batch["features"]) if self.features else model(batch["pixels"])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        return {"loss": loss, "acc": (logits.argmax(-1) == batch["labels"]).float().mean()}
