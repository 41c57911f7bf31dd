"""`train(cfg)`: a contrastive (CLIP / SigLIP) training run from a TrainConfig, alone or under torchrun."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from duomo.data.tokenizers import build_tokenizer
from duomo.data.transforms import image_transform
from duomo.errors import InputError
from duomo.io.text_towers import build_model as build_with_package_weights
from duomo.models import CLIP, create_model
from duomo.train.checkpoint import seed_everything
from duomo.train.config import TrainConfig
from duomo.train.data import caption_bigrams, pair_loader_factory
from duomo.train.distributed import DistInfo, cleanup, init_distributed
from duomo.train.frozen_cache import cache_frozen_features
from duomo.train.losses import build_loss
from duomo.train.objectives.clip import ContrastiveObjective
from duomo.train.trainer import Trainer

log = logging.getLogger("duomo.train")

SIGLIP_INIT_SCALE, SIGLIP_INIT_BIAS = math.log(10), -10.0  # the SigLIP paper's t' = log 10, b = -10


def build_model(cfg: TrainConfig) -> CLIP:
    """The model to train: a named config with random weights, or a `pretrained` checkpoint (any format)."""
    if cfg.pretrained:
        from duomo.io import load_into, read_checkpoint

        config, state = read_checkpoint(cfg.pretrained)[:2]
        model = create_model(config)
        load_into(model, state)
    else:
        model = build_with_package_weights(cfg.model)  # with the pretrained weights a LiT text tower names
        if cfg.loss == "siglip":
            with torch.no_grad():
                model.logit_scale.fill_(SIGLIP_INIT_SCALE)
    if cfg.init_image_from:  # e.g. a trained tower kept frozen (lock_image) while a new text tower learns
        from duomo.io.resolve import read_model

        source, _ = read_model(cfg.init_image_from)
        try:
            model.visual.load_state_dict(source.visual.state_dict())
        except (AttributeError, RuntimeError) as exc:
            raise InputError(
                f"init_image_from {cfg.init_image_from!r}: its image tower does not fit ({exc})"
            ) from exc
    if cfg.loss == "siglip" and model.logit_bias is None:  # SigLIP learns a bias; a CLIP checkpoint has none
        model.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_BIAS))
        model.config = dataclasses.replace(model.config, init_logit_bias=SIGLIP_INIT_BIAS)
    return model


def build_dataset(spec: str, image_size: int, size: int = 2048, language: str = "en") -> Dataset:
    """Training pairs: "shapes", "shapes-objects" (close-ups of one object), "digits", or a path (caption
    folder, ImageFolder, manifest, WDS shards)."""
    if spec in ("shapes", "shapes-objects"):
        from duomo.data.shapes import ShapesDataset

        framing = "object" if spec == "shapes-objects" else "scene"
        return ShapesDataset("train", size=size, image_size=image_size, language=language, framing=framing)
    if spec == "digits":
        from duomo.data.digits import DigitsDataset

        return DigitsDataset("train", image_size=image_size)
    from duomo.data import pairs

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in pairs.MANIFEST_FORMATS:
        return pairs.ManifestPairs(path)
    if path.is_dir():
        if any(p.name.endswith((".tar", ".tar.gz", ".tgz")) for p in path.iterdir()):
            return pairs.WebDatasetPairs(str(path))
        if any(p.suffix.lower() in pairs.CAPTION_EXTENSIONS for p in path.rglob("*")):
            return pairs.FolderPairs(path)
        return pairs.ImageFolderDataset(path)
    if path.suffix in (".tar", ".tgz", ".gz") or any(ch in spec for ch in "*?[{"):
        return pairs.WebDatasetPairs(spec)
    raise InputError(
        f"--data {spec!r} is neither 'shapes', 'shapes-objects', 'digits' nor an existing manifest "
        "(.csv/.tsv/.jsonl), folder, "
        "or WebDataset shard pattern"
    )


def negative_vocabulary(dataset: Dataset) -> frozenset[tuple[str, str]] | None:
    """The word pairs of the training captions, which generated hard negatives keep to; None for streams."""
    texts = getattr(dataset, "texts", None)
    if texts is None:
        log.info("hard negatives: %s cannot list its captions up front; swaps are not restricted", dataset)
        return None
    return caption_bigrams(texts())


def export_meta(cfg: TrainConfig, dataset: Dataset) -> dict[str, Any]:
    """What the exported model records about its training."""
    meta: dict[str, Any] = {
        "trained_with": "duomo train",
        "data": cfg.data,
        "steps": cfg.steps,
        "loss": cfg.loss,
    }
    classes = getattr(dataset, "classes", None)
    if classes:
        meta["classes"] = list(classes)
    return meta


def train(cfg: TrainConfig, info: DistInfo | None = None) -> dict[str, Any]:
    """Train a dual encoder as `cfg` says; returns the final metrics and output paths (see Trainer.fit)."""
    owns_group = info is None and not torch.distributed.is_initialized()  # leave a caller's group alone
    info = info or init_distributed(cfg.device)
    try:
        seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = build_model(cfg)
        vision = model.config.vision
        dataset = build_dataset(cfg.data, vision.image_size, cfg.data_size, cfg.data_language)
        loaders = pair_loader_factory(
            dataset,
            image_transform(vision.image_size, vision.mean, vision.std, train=True),
            build_tokenizer(model.config.text),
            cfg.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            workers=cfg.workers,
            seed=cfg.seed,
            hard_negatives=cfg.hard_negatives,
            pin_memory=info.device.type == "cuda",
            seen=negative_vocabulary(dataset) if cfg.hard_negatives else None,
        )
        if cfg.cache_frozen:
            texts = getattr(dataset, "texts", None)
            for cache in cache_frozen_features(model):
                if texts is not None:  # all captions up front, in a fixed order: LiT's precomputation
                    cache.prefill(build_tokenizer(model.config.text)(sorted(set(texts()))))
                log.info("frozen text features: %d computed up front, the rest once each", len(cache.store))
        objective = ContrastiveObjective(build_loss(cfg.loss, cfg.local_loss, cfg.gather_with_grad))
        trainer = Trainer(model, objective, loaders, cfg, info, meta=export_meta(cfg, dataset))
        if info.is_main:
            n_train = sum(p.numel() for p in trainer.params)
            name, world = cfg.pretrained or cfg.model, info.world_size
            log.info(
                "training %s on %s: %d trainable parameters, %d process(es)", name, cfg.data, n_train, world
            )
        return trainer.fit()
    finally:
        if owns_group:
            cleanup()
