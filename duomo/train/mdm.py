"""Masked data modelling (BEiT-3's one pretraining task) on texts, images and image-text pairs.

- MLM: a share of the text tokens is replaced by a [MASK] embedding; a language-model head (tied to the token
  embeddings by default) predicts the original ids, cross-entropy on masked positions only.
- MIM: block-wise masked patches (BEiT's algorithm) are swapped for the backbone's mask token; a linear head
  regresses the patch's *normalised pixels* (each patch minus its mean, over its std: MAE's target). The paper
  predicts BEiT v2 visual tokens; those need a trained tokenizer, which the issue allows to replace with
  pixels. Mean-squared error on masked patches only.
- Pairs: both at once, in one fused forward.

Masking ratios are the paper's: 15% of monomodal text tokens, 50% of the text tokens of a pair, 40% of the
image patches (block-wise). The CLIP vocabulary has no [MASK] id, so the mask is a learned embedding selected
by the virtual id `vocab_size` (one past the vocabulary; the head never predicts it).

Objectives follow `duomo.train.trainer.Objective` (`objective(model, batch) -> {"loss": ...}`), so they run
under the full `Trainer` too; `train_steps` is the short single-process loop used by tests and benches.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duomo.errors import CheckpointError
from duomo.models.beit3 import BEiT3, BEiT3Config
from duomo.models.multiway import route

TEXT_RATIO = 0.15  # monomodal text
PAIR_TEXT_RATIO = 0.5  # text of image-text pairs
IMAGE_RATIO = 0.4  # image patches, block-wise


class MaskedLMHead(nn.Module):
    """Dense -> GELU -> LayerNorm -> vocabulary logits; the output matrix is the token embedding if tied."""

    def __init__(self, backbone: BEiT3, tie: bool = True) -> None:
        super().__init__()
        dim, vocab = backbone.cfg.width, backbone.cfg.vocab_size
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=backbone.cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.tied = tie
        # a tied head reads the backbone's embedding at call time (no second reference, no shared tensor)
        self.decoder = None if tie else nn.Linear(dim, vocab, bias=False)
        nn.init.trunc_normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)
        if self.decoder is not None:
            nn.init.trunc_normal_(self.decoder.weight, std=0.02)

    def forward(
        self, h: torch.Tensor, embedding: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states [..., width] -> logits [..., vocab]; `embedding` is the backbone's token table.

        `rows`: score only these token ids (a vocabulary shortlist): logits [..., len(rows)].
        """
        h = self.norm(F.gelu(self.dense(h)))
        weight, bias = (embedding if self.decoder is None else self.decoder.weight), self.bias
        if rows is not None:
            weight, bias = weight[rows], bias[rows]
        return F.linear(h, weight, bias)


class TextMaskEmbedding(nn.Module):
    """Token + position embeddings where id `vocab_size` reads a learned [MASK] vector instead."""

    def __init__(self, backbone: BEiT3) -> None:
        super().__init__()
        self.mask_id = backbone.cfg.vocab_size
        self.mask_token = nn.Parameter(torch.empty(1, 1, backbone.cfg.width))
        nn.init.normal_(self.mask_token, std=backbone.cfg.width**-0.5)

    def forward(self, backbone: BEiT3, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Ids [B, T] (may hold `mask_id`) at text positions start.. -> embeddings [B, T, width]."""
        cfg = backbone.cfg
        if cfg.pos_offset + start + ids.shape[1] > cfg.max_text_positions:
            from duomo.errors import InputError

            raise InputError(f"text of {start + ids.shape[1]} tokens is longer than this model allows")
        masked = ids == self.mask_id
        x = backbone.text_embed(ids.masked_fill(masked, 0))
        x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x) * backbone.embed_scale
        pos = backbone.pos_embed.text.weight[cfg.pos_offset + start : cfg.pos_offset + start + ids.shape[1]]
        return x + pos.to(x.dtype)


def fused_forward(
    backbone: BEiT3,
    text_embedding: TextMaskEmbedding,
    images: torch.Tensor | None,
    ids: torch.Tensor | None,
    padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    vision_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """BEiT3.forward with text ids that may hold [MASK]; same routing, padding and attention masks."""
    parts = []
    if images is not None:
        parts.append(backbone.embed_images(images, vision_mask))
    if ids is not None:
        parts.append(text_embedding(backbone, ids))
    split = parts[0].shape[1] if images is not None else 0
    x = route(backbone.embed_norm, torch.cat(parts, dim=1), split)
    mask = None
    if padding_mask is not None and ids is not None:
        pad = F.pad(padding_mask.bool(), (split, 0), value=False)
        x = x * (~pad).unsqueeze(-1).to(x.dtype)
        mask = ~pad[:, None, None, :]
    if attn_mask is not None:
        allowed = attn_mask.bool()
        allowed = allowed.unsqueeze(1) if allowed.ndim == 3 else allowed
        mask = allowed if mask is None else mask & allowed
    return backbone.encoder(x, split, mask)


class BEiT3ForMDM(nn.Module):
    """Backbone + [MASK] text embedding + MLM head + MIM pixel head: the pretraining model."""

    def __init__(self, backbone: BEiT3, tie_lm_head: bool = True) -> None:
        super().__init__()
        cfg = backbone.cfg
        self.beit3 = backbone
        self.text_mask = TextMaskEmbedding(backbone)
        self.lm_head = MaskedLMHead(backbone, tie=tie_lm_head)
        self.mim_head = nn.Linear(cfg.width, cfg.patch_size**2 * cfg.in_chans)
        nn.init.trunc_normal_(self.mim_head.weight, std=0.02)
        nn.init.zeros_(self.mim_head.bias)

    def forward(
        self,
        images: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of masked inputs (see `fused_forward`)."""
        return fused_forward(self.beit3, self.text_mask, images, ids, padding_mask, None, vision_mask)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of text hidden states."""
        return self.lm_head(h, self.beit3.text_embed.weight)


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
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def mask_batch(self, model: BEiT3ForMDM, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masked inputs and their targets for one batch."""
        out: dict[str, torch.Tensor] = {}
        pixels, tokens = batch.get("pixels"), batch.get("tokens")
        if pixels is not None and self.cfg.image_ratio > 0:
            grid = model.beit3.grid
            masks = [block_mask(grid, self.cfg.image_ratio, rng=self.rng) for _ in range(pixels.shape[0])]
            out["vision_mask"] = torch.stack(masks).to(pixels.device)
        if tokens is not None:
            ratio = self.cfg.pair_text_ratio if pixels is not None else self.cfg.text_ratio
            ids, chosen = mask_text(
                tokens.cpu(),
                batch["padding_mask"].cpu(),
                ratio,
                model.text_mask.mask_id,
                self.cfg.special_ids,
                self.gen,
            )
            out["ids"], out["text_mask"] = ids.to(tokens.device), chosen.to(tokens.device)
        return out

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masked-data-modelling loss of one batch."""
        inner: BEiT3ForMDM = getattr(model, "module", model)
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


def train_steps(
    model: nn.Module,
    objective: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
    batches: Iterator[Any],
    steps: int,
    lr: float = 1e-3,
    wd: float = 0.05,
    warmup: int = 0,
    grad_clip: float = 1.0,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    head_lr_weight: float = 1.0,
) -> list[dict[str, float]]:
    """A short AdamW + cosine loop for single-process runs; returns one record of scalar metrics per step.

    Parameters outside `beit3.*` (task heads) train at `lr * head_lr_weight`.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0 if name.startswith("beit3.") else head_lr_weight  # unilm's task_head_lr_weight
        decays = p.ndim >= 2 and "embed" not in name
        groups.setdefault((scale, wd if decays else 0.0), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": lr * sc, "weight_decay": d} for (sc, d), ps in groups.items()],
        lr=lr,
        betas=(0.9, 0.98),
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    records = []
    start = time.perf_counter()
    for step in range(steps):
        out = objective(model, next(batches))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        records.append({k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0})
        if log_every and (step + 1) % log_every == 0:
            stats = " ".join(f"{k}={v:.4f}" for k, v in records[-1].items())
            log(f"step {step + 1}/{steps} {stats} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return records


def tokenize(texts: list[str], context_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP ids [N, T] (<sot> ... <eot>, trimmed to the longest) and the padding mask (True at padding)."""
    from duomo.data.tokenizer import get_tokenizer

    tok = get_tokenizer(context_length)
    ids = tok(texts)
    eot = (ids == tok.eot_token_id).int().argmax(1)
    pad = torch.arange(ids.shape[1]).unsqueeze(0) > eot.unsqueeze(1)
    length = int(eot.max()) + 1
    return ids[:, :length], pad[:, :length]


def shapes_pixels(samples: list[dict], image_size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """The rendered images of shapes samples as a normalised batch [N, 3, S, S]."""
    from duomo.data.transforms import image_transform

    transform = image_transform(image_size, mean, std)
    return torch.stack([transform(s["image"]) for s in samples])


def shapes_mdm_batches(
    backbone: BEiT3,
    size: int = 2048,
    batch_size: int = 32,
    seed: int = 0,
    max_objects: int = 2,
    kinds: tuple[str, ...] = ("image", "text", "pair"),
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless pretraining batches of the shapes train split, cycling image-only, text-only and pair batches.

    Texts are the captions and the "question answer" strings of the QA pairs (monomodal text).
    """
    from duomo.data.shapes import ShapesDataset

    cfg = backbone.cfg
    ds = ShapesDataset("train", size=size, image_size=cfg.image_size, seed=seed, max_objects=max_objects)
    samples = [ds[i] for i in range(size)]
    pixels = shapes_pixels(samples, cfg.image_size, cfg.mean, cfg.std)
    captions = [s["text"] for s in samples]
    qa_texts = [f"{q} {a}" for s in samples for q, a in s["qa"]]
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        kind = kinds[step % len(kinds)]
        step += 1
        idx = torch.randint(0, size, (batch_size,), generator=gen)
        batch: dict[str, torch.Tensor] = {}
        if kind in ("image", "pair"):
            batch["pixels"] = pixels[idx]
        if kind == "pair":
            batch["tokens"], batch["padding_mask"] = tokenize([captions[i] for i in idx.tolist()])
        if kind == "text":
            pick = torch.randint(0, len(qa_texts) + size, (batch_size,), generator=gen).tolist()
            texts = [qa_texts[i] if i < len(qa_texts) else captions[i - len(qa_texts)] for i in pick]
            batch["tokens"], batch["padding_mask"] = tokenize(texts)
        yield batch


def pretrain_shapes(
    config: str = "beit3-tiny",
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    size: int = 2048,
    seed: int = 0,
    log_every: int = 50,
    vision_init: str | None = None,
    freeze_vision: bool = False,
) -> tuple[BEiT3ForMDM, list[dict[str, float]]]:
    """Masked-data-modelling pretraining of a BEiT-3 on the shapes train split: a fresh backbone, or with
    `vision_init` (a duomo CLIP name or folder) one whose vision pathway starts from that image tower.

    `freeze_vision` (VLMo's second stage, for a `vision_init` start): the vision-only parameters stay fixed,
    so there is no image modelling: MLM on texts and on the text of pairs, whose images stay unmasked.
    """
    from duomo.data.tokenizer import get_tokenizer
    from duomo.models.beit3_init import freeze_vision as freeze
    from duomo.models.beit3_init import start_backbone

    torch.manual_seed(seed)
    model = BEiT3ForMDM(start_backbone(config, vision_init))
    tok = get_tokenizer()
    cfg = MDMConfig(special_ids=(tok.sot_token_id, tok.eot_token_id))
    kinds: tuple[str, ...] = ("image", "text", "pair")
    if freeze_vision:
        freeze(model)
        cfg.image_ratio, kinds = 0.0, ("text", "pair")
    objective = MDMObjective(cfg, seed=seed)
    batches = shapes_mdm_batches(model.beit3, size, batch_size, seed, kinds=kinds)
    records = train_steps(model, objective, batches, steps, lr, warmup=steps // 10, log_every=log_every)
    return model, records


MDM_TASK = "mdm"


def read_task_config(path: str | Path, task: str) -> dict:
    """config.json of a task model folder, checked to be for `task`; clear errors otherwise."""
    from duomo.io.files import read_json

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no model folder at {path}; pass a folder written by `duomo beit3-train`")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; is it a duomo BEiT-3 task model?")
    data = read_json(path / "config.json")
    found = data.get("task")
    if found != task:
        what = f"a {found!r} model" if found else "not a BEiT-3 task model"
        raise CheckpointError(f"{path} is {what}, not a {task!r} model; pass a model fine-tuned for {task}")
    return data


def save_task_folder(model: nn.Module, path: str | Path, task: str, **meta: Any) -> Path:
    """Write a BEiT-3 task model folder: config.json (`task`, the backbone config, the CLIP its vision pathway
    started from, `meta`) and model.safetensors; `read_task_config` + `load_task_weights` read it back."""
    from duomo.io.files import save_safetensors, write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone = model.beit3
    config = {"task": task, "beit3": backbone.cfg.to_dict(), "vision_init": backbone.vision_init, **meta}
    write_json(config, path / "config.json")
    save_safetensors(model.state_dict(), path / "model.safetensors", {"task": task})
    return path


def load_task_weights(model: nn.Module, path: Path, config: dict) -> None:
    """Load model.safetensors of a task folder strictly (naming missing/unexpected keys on failure) and
    restore what its `config` records beside the weights: the CLIP the vision pathway started from."""
    from duomo.io.files import load_weights

    sd = load_weights(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.beit3.vision_init = config.get("vision_init")


def save_mdm(model: BEiT3ForMDM, path: str | Path) -> Path:
    """Write a pretrained model folder: config.json (task "mdm", backbone config) + model.safetensors."""
    return save_task_folder(model, path, MDM_TASK, tie_lm_head=model.lm_head.tied)


def load_mdm(path: str | Path) -> BEiT3ForMDM:
    """A pretrained model folder written by `save_mdm`."""
    path = Path(path)
    data = read_task_config(path, MDM_TASK)
    model = BEiT3ForMDM(BEiT3(BEiT3Config.from_dict(data["beit3"])), data.get("tie_lm_head", True))
    load_task_weights(model, path, data)
    return model
