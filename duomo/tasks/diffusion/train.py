"""Train a text-to-image generator through the one `Trainer`, conditioned on a frozen duomo CLIP text tower.

`TrainConfig.model` names a generator config (`architecture: "text-to-image"`, e.g. `dit-shapes-32`), and
`text_from` the CLIP whose text tower conditions it (a shipped name such as `shapes-tiny`, a folder, any
checkpoint duomo reads). The data is what CLIP training reads (`--data shapes`, manifests, caption folders,
WebDataset shards). The tower stays frozen; its token states are computed once per distinct caption.
Everything else is the trainer's: accumulation, bf16, DDP under torchrun, exact resume, curves, EMA.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from duomo.data.transforms import image_transform
from duomo.errors import ConfigError, InputError
from duomo.io.generator import load_generator, save_generator
from duomo.io.resolve import read_model
from duomo.models.clip.text import TextTransformer
from duomo.models.diffusion.text_to_image import GeneratorConfig, TextToImage, build_text_to_image
from duomo.models.factory import read_config_json
from duomo.tasks.diffusion.generate import PromptTokenizer
from duomo.train.checkpoint import seed_everything
from duomo.train.config import TrainConfig
from duomo.train.data import pair_loader_factory
from duomo.train.distributed import DistInfo, process_group, resolve_device
from duomo.train.frozen_cache import cache_frozen_features
from duomo.train.objectives.diffusion import DenoisingObjective
from duomo.train.run import build_dataset
from duomo.train.trainer import Trainer

log = logging.getLogger("duomo.train")


def generator_config(name: str, text_from: str) -> tuple[GeneratorConfig, TextTransformer]:
    """A generator config named `name`, sized to the text tower of the CLIP `text_from` (and that tower)."""
    data = read_config_json(name)
    if data.get("architecture") != "text-to-image":
        raise ConfigError(
            f"{name!r} is not a text-to-image config (architecture {data.get('architecture')!r})"
        )
    clip, _ = read_model(text_from)
    text = getattr(clip, "text", None)
    if not isinstance(text, TextTransformer):
        raise InputError(
            f"text_from {text_from!r}: a generator is conditioned on a CLIP-style text Transformer "
            f"(token states); this model's text tower is a {type(text).__name__}"
        )
    denoiser = dict(data.get("denoiser") or {})
    if data.get("denoiser_kind", "dit") == "unet":  # diffusers' name for the width it cross-attends to
        denoiser["cross_attention_dim"] = clip.config.text.width
    else:
        denoiser["context_dim"] = clip.config.text.width
    if data.get("pooled"):
        denoiser["pooled_dim"] = clip.config.embed_dim
    fields = {
        **data,
        "denoiser": denoiser,
        "text": dataclasses.asdict(clip.config.text),
        "text_embed_dim": clip.config.embed_dim,
    }
    return GeneratorConfig.from_dict(fields), text


def build_generator(cfg: TrainConfig) -> tuple[TextToImage, dict[str, Any]]:
    """The generator to train: a config with random weights and `text_from`'s tower, or a `pretrained` one."""
    if cfg.pretrained:
        model, meta = load_generator(cfg.pretrained)
        return model.train(), meta
    if not cfg.text_from:
        raise ConfigError("training a generator needs text_from: the CLIP whose text tower conditions it")
    gen_cfg, text = generator_config(cfg.model, cfg.text_from)
    model = build_text_to_image(gen_cfg)
    model.text.load_state_dict(text.state_dict())
    return model, {"text_from": cfg.text_from}


def build_trainer(cfg: TrainConfig, info: DistInfo | None = None) -> Trainer:
    """The `Trainer` of a generator run (model, data, objective, export) on this process."""
    info = info or DistInfo(device=resolve_device(cfg.device))
    seed_everything(cfg.seed)
    model, meta = build_generator(cfg)
    model.text.requires_grad_(False)
    if model.autoencoder is not None:
        model.autoencoder.requires_grad_(False)
    gen = model.config
    dataset = build_dataset(cfg.data, gen.image_size, cfg.data_size, cfg.data_language)
    tokenizer = PromptTokenizer(gen.text, gen.pad_token_id)
    loaders = pair_loader_factory(
        dataset,
        image_transform(gen.image_size, (0.5,) * 3, (0.5,) * 3, train=False),  # pixels in [-1, 1]
        tokenizer,
        cfg.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        workers=cfg.workers,
        seed=cfg.seed,
        pin_memory=info.device.type == "cuda",
    )
    empty = tokenizer([""])[0]
    if cfg.cache_frozen:
        texts = getattr(dataset, "texts", None)
        for cache in cache_frozen_features(model):
            if texts is not None:  # every caption once, up front, in a fixed order
                cache.prefill(tokenizer(sorted(set(texts())) + [""]))
            log.info("text states: %d captions computed up front, the rest once each", len(cache.store))
    objective = DenoisingObjective(empty, cfg.caption_dropout, cfg.min_snr_gamma)
    meta = {**meta, "trained_with": "duomo train --task text-to-image", "data": cfg.data}
    meta["steps"] = cfg.steps

    def export(module: torch.nn.Module, out: Any) -> Any:
        return save_generator(module, out / "model", meta)

    frozen = ["text"] + (["autoencoder"] if model.autoencoder is not None else [])
    trainer = Trainer(model, objective, loaders, cfg, info, freeze=frozen, meta=meta, export=export)
    if info.is_main:
        n_train = sum(p.numel() for p in trainer.params)
        kind = gen.denoiser_kind
        log.info("training a %s generator on %s: %d trainable parameters", kind, cfg.data, n_train)
    return trainer


def train_generator(cfg: TrainConfig, info: DistInfo | None = None) -> dict[str, Any]:
    """Train as `cfg` says, alone or under torchrun; returns `Trainer.fit`'s result ("model": the generator
    folder OUT/model)."""
    with process_group(cfg.device, info) as joined:
        return build_trainer(cfg, joined).fit()
