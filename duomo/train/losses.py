"""Contrastive losses for dual encoders: CLIP's InfoNCE and SigLIP's pairwise sigmoid, both distributed-aware.

Both take L2-normalised embeddings and the model's *exponentiated* temperature (`CLIP.forward` returns
`logit_scale` already exp'd). Neither clamps it: as in OpenCLIP the trainer clamps the raw parameter to
`ln(100)` after each optimiser step (`Trainer.max_logit_scale`), so the loss stays a pure function.

Distributed semantics follow OpenCLIP. With no process group (or one process) everything is local. With N
ranks each holding B rows:

- `gather_with_grad=True` all-gathers features through `torch.distributed.nn.functional.all_gather`, whose
  backward sums the gradients of every rank's loss; DDP then averages over ranks, so the update equals the
  one of a single process on the concatenated batch.
- `local_loss=False` builds the global [NB, NB] logits on every rank (every rank's loss is the full-batch
  loss); `local_loss=True` builds only this rank's rows [B, NB] (the mean over ranks is the full-batch loss)
  which saves memory and compute.

Hard negatives (NegCLIP): extra captions that do not match any image. Pass them as `neg_text_embeds`
[B * n_neg, D] (or [B, n_neg, D]), or append them to `text_embeds` so it has B * (1 + n_neg) rows whose first
B rows are the positives. They become extra columns of the image-to-text logits; the text-to-image direction
uses the positives only, as in NegCLIP.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from duomo.errors import InputError


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(x: torch.Tensor, with_grad: bool) -> list[torch.Tensor]:
    """Every rank's copy of `x` (same shape on all ranks), with gradients flowing back to owners or not."""
    if with_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        with warnings.catch_warnings():  # deprecated in favour of a functional API gloo cannot run backwards
            warnings.simplefilter("ignore", FutureWarning)
            return list(all_gather_with_grad(x))
    rank, world = world_info()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    out[rank] = x  # without this, this rank's own rows would get no gradient either
    return out


def gather(x: torch.Tensor | None, with_grad: bool) -> torch.Tensor | None:
    """All ranks' rows of `x` concatenated in rank order ([N * B, ...]); `x` itself in a single process."""
    if x is None or world_info()[1] == 1:
        return x
    return torch.cat(all_gather(x, with_grad), dim=0)


def split_negatives(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, neg_text_embeds: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Separate positives [B, D] from hard negatives [B * n_neg, D] (or None), checking shapes."""
    b = image_embeds.shape[0]
    if text_embeds.ndim != 2 or image_embeds.ndim != 2:
        raise InputError(
            f"embeddings must be [rows, dim]; got {tuple(image_embeds.shape)}, {tuple(text_embeds.shape)}"
        )
    if text_embeds.shape[0] != b:
        if text_embeds.shape[0] % b != 0 or neg_text_embeds is not None:
            raise InputError(
                f"{text_embeds.shape[0]} text rows for {b} images: pass B rows, or B * (1 + n_neg) rows "
                "with the B positives first (or the negatives separately as neg_text_embeds)"
            )
        text_embeds, neg_text_embeds = text_embeds[:b], text_embeds[b:]
    if neg_text_embeds is not None:
        neg_text_embeds = neg_text_embeds.reshape(-1, text_embeds.shape[-1])
        if neg_text_embeds.shape[0] % b != 0:
            raise InputError(
                f"{neg_text_embeds.shape[0]} hard-negative rows is not a multiple of the batch {b}"
            )
        if neg_text_embeds.shape[0] == 0:
            neg_text_embeds = None
    return text_embeds, neg_text_embeds


class ClipLoss(nn.Module):
    """InfoNCE both ways (image->text and text->image cross-entropy, averaged), as OpenCLIP's ClipLoss."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        neg_text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy of matching each image to its caption and each caption to its image."""
        text_embeds, neg_text_embeds = split_negatives(image_embeds, text_embeds, neg_text_embeds)
        rank, world = world_info()
        all_images = gather(image_embeds, self.gather_with_grad)
        all_texts = gather(text_embeds, self.gather_with_grad)
        all_negs = gather(neg_text_embeds, self.gather_with_grad)
        candidates = all_texts if all_negs is None else torch.cat([all_texts, all_negs])
        if self.local_loss or world == 1:
            logits_per_image = logit_scale * image_embeds @ candidates.T  # [B, N*B (+ negatives)]
            logits_per_text = logit_scale * text_embeds @ all_images.T  # [B, N*B]
            labels = (
                torch.arange(image_embeds.shape[0], device=image_embeds.device) + rank * image_embeds.shape[0]
            )
        else:
            logits_per_image = logit_scale * all_images @ candidates.T  # [N*B, N*B (+ negatives)]
            logits_per_text = logits_per_image[:, : all_texts.shape[0]].T
            labels = torch.arange(all_images.shape[0], device=image_embeds.device)
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """SigLIP: an independent binary (sigmoid) loss on every image-text pair, summed, divided by the images.

    Matches OpenCLIP's SigLipLoss: local images against all ranks' texts, `-sum(logsigmoid(z * logits)) / B`
    with z = +1 on matching pairs and -1 elsewhere; hard negatives add -1 columns. With `local_loss=False`
    every rank computes the global [N*B, N*B] loss divided by N*B instead (the same value on every rank).
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        neg_text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pairwise sigmoid loss per image (sum over texts, mean over images)."""
        text_embeds, neg_text_embeds = split_negatives(image_embeds, text_embeds, neg_text_embeds)
        rank, world = world_info()
        all_texts = gather(text_embeds, self.gather_with_grad)
        all_negs = gather(neg_text_embeds, self.gather_with_grad)
        images = image_embeds
        offset = rank * image_embeds.shape[0]
        if world > 1 and not self.local_loss:
            images, offset = gather(image_embeds, self.gather_with_grad), 0
        candidates = all_texts if all_negs is None else torch.cat([all_texts, all_negs])
        logits = logit_scale * images @ candidates.T
        if logit_bias is not None:
            logits = logits + logit_bias
        signs = -torch.ones_like(logits)
        rows = torch.arange(images.shape[0], device=logits.device)
        signs[rows, rows + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum() / images.shape[0]


LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def build_loss(name: str, local_loss: bool = True, gather_with_grad: bool = True) -> nn.Module:
    """A contrastive loss by name ("clip" or "siglip")."""
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](local_loss=local_loss, gather_with_grad=gather_with_grad)
