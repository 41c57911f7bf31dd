"""The BEiT-3 family's training objectives, each `objective(model, batch) -> {"loss", ...}` for the one
`Trainer`: masked data modelling (pretraining), VQA, captioning, dual-encoder retrieval, classification.

Masked data modelling (BEiT-3's one pretraining task) on texts, images and image-text pairs:
- MLM: a share of the text tokens is replaced by the virtual [MASK] id (`vocab_size`, read from the head's
  learned mask embedding); the language-model head predicts the original ids, cross-entropy on masked
  positions only.
- MIM: block-wise masked patches (BEiT's algorithm) are swapped for the backbone's mask token; a linear head
  regresses the patch's *normalised pixels* (MAE's target; the paper predicts BEiT v2 visual tokens, which
  need a trained tokenizer). Mean-squared error on masked patches only.
- Pairs: both at once, in one fused forward.
Masking ratios are the paper's: 15% of monomodal text tokens, 50% of the text tokens of a pair, 40% of the
image patches (block-wise). Masks are drawn from a generator seeded per batch (`batch["seed"]`, set by the
loader), so a resumed run masks exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duomo.errors import InputError
from duomo.models.beit3 import BEiT3ForCaptioning, BEiT3ForMDM, BEiT3ForRetrieval
from duomo.train.losses import ClipLoss

TEXT_RATIO = 0.15  # monomodal text
PAIR_TEXT_RATIO = 0.5  # text of image-text pairs
IMAGE_RATIO = 0.4  # image patches, block-wise
CAPTION_MASK_PROB = 0.6  # unilm's captioning fine-tuning mask probability
VQA_LOSSES = ("bce", "ce")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def batch_generator(batch: dict, fallback: torch.Generator) -> tuple[torch.Generator, random.Random]:
    """(torch generator, random.Random) for a batch's masks: seeded by the batch's "seed" when the loader
    gives one (exact resume), else the objective's own running generator."""
    seed = batch.get("seed")
    if seed is None:
        return fallback, random.Random(int(torch.randint(0, 2**62, (1,), generator=fallback)))
    seed = int(seed.reshape(-1)[0]) if torch.is_tensor(seed) else int(seed)
    return torch.Generator().manual_seed(seed), random.Random(seed)


def mask_text(
    ids: torch.Tensor,
    padding_mask: torch.Tensor,
    ratio: float,
    mask_id: int,
    special: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace round(ratio * n) of each row's n maskable tokens by `mask_id` -> (masked ids, bool mask).

    Padding and `special` ids (start/end tokens) are never masked; each row with a maskable token gets >= 1.
    """
    maskable = ~padding_mask.bool()
    for s in special:
        maskable &= ids != s
    scores = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill(~maskable, 2.0)
    counts = maskable.sum(1)
    k = torch.where(
        counts > 0, (counts.float() * ratio).round().clamp(min=1), torch.zeros_like(counts.float())
    )
    ranks = scores.argsort(1).argsort(1)
    chosen = (ranks < k.long().unsqueeze(1)) & maskable
    return ids.masked_fill(chosen, mask_id), chosen


def block_mask(
    grid: int,
    ratio: float = IMAGE_RATIO,
    min_patches: int = 4,
    min_aspect: float = 0.3,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """BEiT's block-wise masking: random rectangles until `ratio` of a grid x grid patch map is masked."""
    rng = rng or random.Random()
    target = round(ratio * grid * grid)
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(100 * grid * grid):
        left = target - int(mask.sum())
        if left <= 0:
            break
        area = rng.uniform(min(min_patches, left), max(min(min_patches, left), left))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = max(1, min(grid, round(math.sqrt(area * aspect))))
        w = max(1, min(grid, round(math.sqrt(area / aspect))))
        top, lft = rng.randint(0, grid - h), rng.randint(0, grid - w)
        block = mask[top : top + h, lft : lft + w]
        new = int((~block).sum())
        if 0 < new <= left:  # BEiT keeps a block only when it does not overshoot the target
            block.fill_(True)
    while int(mask.sum()) < target:  # rare: finish with single patches so the ratio is exact
        free = (~mask).flatten().nonzero().flatten().tolist()
        mask.view(-1)[rng.choice(free)] = True
    return mask.flatten()


def patch_targets(images: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Images [B, C, H, W] -> per-patch normalised pixels [B, patches, patch * patch * C] (MAE's target)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    x = x.reshape(b, (h // patch) * (w // patch), patch * patch * c)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


@dataclass
class MDMConfig:
    """Masking ratios (the paper's defaults) and the special ids that are never masked."""

    text_ratio: float = TEXT_RATIO
    pair_text_ratio: float = PAIR_TEXT_RATIO
    image_ratio: float = IMAGE_RATIO
    special_ids: tuple[int, ...] = ()
    mlm_weight: float = 1.0
    mim_weight: float = 1.0


class MDMObjective:
    """`objective(model, batch)`: masks the batch, returns {"loss", "mlm", "mim"} (masked positions only).

    A batch has "pixels" [B, 3, H, W] and/or "tokens" [B, T] with "padding_mask"; both make a pair batch.
    """

    def __init__(self, cfg: MDMConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or MDMConfig()
        self.gen = torch.Generator().manual_seed(seed)

    def mask_batch(self, model: BEiT3ForMDM, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masked inputs and their targets for one batch."""
        gen, rng = batch_generator(batch, self.gen)
        out: dict[str, torch.Tensor] = {}
        pixels, tokens = batch.get("pixels"), batch.get("tokens")
        if pixels is not None and self.cfg.image_ratio > 0:
            grid = model.beit3.grid
            masks = [block_mask(grid, self.cfg.image_ratio, rng=rng) for _ in range(pixels.shape[0])]
            out["vision_mask"] = torch.stack(masks).to(pixels.device)
        if tokens is not None:
            ratio = self.cfg.pair_text_ratio if pixels is not None else self.cfg.text_ratio
            ids, chosen = mask_text(
                tokens.cpu(),
                batch["padding_mask"].cpu(),
                ratio,
                model.text_mask.mask_id,
                self.cfg.special_ids,
                gen,
            )
            out["ids"], out["text_mask"] = ids.to(tokens.device), chosen.to(tokens.device)
        return out

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masked-data-modelling loss of one batch."""
        inner: BEiT3ForMDM = unwrap(model)
        m = self.mask_batch(inner, batch)
        pixels = batch.get("pixels")
        h = model(pixels, m.get("ids"), batch.get("padding_mask"), m.get("vision_mask"))
        split = inner.beit3.num_image_tokens if pixels is not None else 0
        mlm = mim = torch.zeros((), device=h.device)  # a batch without that modality
        if "ids" in m:
            logits = inner.lm_logits(h[:, split:][m["text_mask"]])
            mlm = F.cross_entropy(logits.float(), batch["tokens"][m["text_mask"]])
        if "vision_mask" in m:
            pred = inner.mim_head(h[:, 1:split][m["vision_mask"]])
            target = patch_targets(pixels, inner.beit3.cfg.patch_size)[m["vision_mask"]]
            mim = F.mse_loss(pred.float(), target.float())
        loss = self.cfg.mlm_weight * mlm + self.cfg.mim_weight * mim
        return {"loss": loss, "mlm": mlm.detach(), "mim": mim.detach()}


class CaptionObjective:
    """Mask `ratio` of each caption's tokens after the start id (end id included), cross-entropy on the
    masked ones (unilm's captioning fine-tuning)."""

    def __init__(self, ratio: float = CAPTION_MASK_PROB, seed: int = 0) -> None:
        self.ratio = ratio
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss", "acc"} of one batch of "pixels", "tokens", "padding_mask"."""
        inner: BEiT3ForCaptioning = unwrap(model)
        gen, _ = batch_generator(batch, self.gen)
        tokens = batch["tokens"]
        ids, chosen = mask_text(
            tokens.cpu(), batch["padding_mask"].cpu(), self.ratio, inner.mask_id, (inner.sot_id,), gen
        )
        ids, chosen = ids.to(tokens.device), chosen.to(tokens.device)
        logits = model(batch["pixels"], ids)[chosen]
        target = inner.target_index(tokens[chosen])
        loss = F.cross_entropy(logits.float(), target)
        return {"loss": loss, "acc": (logits.argmax(-1) == target).float().mean()}


class VQAObjective:
    """The VQA loss on a batch's answer "scores" [B, A] (VQAv2's soft scores; one-hot where a question has
    one right answer) or "target" answer indices [B]. "bce" is unilm's (mean BCE-with-logits times the number
    of answers), made for soft multi-annotator scores; "ce" is softmax cross-entropy against the scores
    normalised to a distribution, which for one right answer per question (shapes) leaves the
    all-answers-unlikely phase BCE starts with much sooner. "acc" is VQA accuracy: the score of the top
    answer.
    """

    def __init__(self, loss: str = "bce") -> None:
        if loss not in VQA_LOSSES:
            raise InputError(f"unknown VQA loss {loss!r}; choose one of {VQA_LOSSES}")
        self.loss = loss

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss", "acc"} of one batch."""
        logits = model(batch["pixels"], batch["tokens"], batch["padding_mask"])
        scores = batch.get("scores")
        if scores is None:
            scores = F.one_hot(batch["target"], logits.shape[-1])
        scores = scores.to(logits.dtype)
        if self.loss == "ce":
            dist = scores / scores.sum(-1, keepdim=True).clamp(min=1e-6)
            loss = -(dist * F.log_softmax(logits.float(), -1)).sum(-1).mean()
        else:
            loss = F.binary_cross_entropy_with_logits(logits, scores) * logits.shape[-1]
        acc = scores.gather(1, logits.argmax(-1, keepdim=True)).float().mean()
        return {"loss": loss, "acc": acc}


class RetrievalObjective:
    """Contrastive loss of a batch of "pixels", "tokens", "padding_mask" (image i matches caption i)."""

    def __init__(self) -> None:
        self.loss = ClipLoss()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss", "acc"}: acc is how often an image's nearest caption in the batch is its own."""
        inner: BEiT3ForRetrieval = unwrap(model)
        images = inner.encode_image(batch["pixels"])
        texts = inner.encode_text(batch["tokens"], batch["padding_mask"])
        loss = self.loss(images, texts, inner.logit_scale.exp().clamp(max=100))
        right = torch.arange(images.shape[0], device=images.device)
        return {"loss": loss, "acc": ((images @ texts.T).argmax(-1) == right).float().mean()}


def classify_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy and accuracy of one batch of "pixels" and "labels"."""
    logits = model(batch["pixels"])
    loss = F.cross_entropy(logits.float(), batch["labels"])
    return {"loss": loss, "acc": (logits.argmax(-1) == batch["labels"]).float().mean()}
