"""Train a vision-language chat model through the one `Trainer`, in LLaVA's two stages.

Stage 1 aligns the projector on image descriptions (vision tower and language model frozen); stage 2
instruction-tunes the projector plus LoRA adapters on the language model (or the whole LM with `train_lm`) on
conversations, the loss on the assistant's tokens only. The parts are named: `vision_from` (a duomo CLIP's
image tower), `lm_from` ("smollm2", a GGUF file, a transformers directory); `model` names the joining config
(`chat-shapes`: which vision layer, pooling, projector, system prompt). `pretrained` continues from a chat
folder (stage 2 after stage 1). Data: "shapes" (the built-in world as conversations) or a LLaVA JSON/JSONL
file of the user's own, or caption pairs (manifests, folders, shards) for stage 1.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from duomo.data.conversations import ConversationDataset, PairConversations, read_conversations
from duomo.data.pairs import SkipStats
from duomo.data.transforms import image_transform
from duomo.errors import ConfigError
from duomo.io.chat import assemble, load_chat, save_chat
from duomo.models.factory import read_config_json
from duomo.models.lm.vlm import VLMConfig
from duomo.tasks.lm.chat_data import collate_conversations
from duomo.train.checkpoint import seed_everything
from duomo.train.config import TrainConfig
from duomo.train.data import map_loader_factory
from duomo.train.distributed import DistInfo, process_group, resolve_device
from duomo.train.objectives.lm import NextTokenObjective
from duomo.train.run import build_dataset
from duomo.train.trainer import Trainer

log = logging.getLogger("duomo.train")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def chat_config(name: str, vision_cfg: Any, lm_cfg: Any, image_token_id: int) -> tuple[VLMConfig, str | None]:
    """The joining config `name` (vision layer, pooling, projector, system prompt), sized to the parts."""
    data = dict(read_config_json(name))
    if data.get("architecture") != "vision-language":
        raise ConfigError(
            f"{name!r} is not a vision-language config (architecture {data.get('architecture')!r})"
        )
    system = data.pop("system", None)
    data.pop("architecture")
    fields = {
        "vision": dataclasses.asdict(vision_cfg),
        "lm": lm_cfg.to_dict(),
        "image_token_id": image_token_id,
    }
    return VLMConfig.from_dict({**data, **fields}), system


def build_chat_model(cfg: TrainConfig) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, meta) to train: a chat folder to continue, or parts joined by a config."""
    lora = None
    if cfg.lora_rank:
        lora = {"rank": cfg.lora_rank, "alpha": 2.0 * cfg.lora_rank, "targets": LORA_TARGETS}
        lora["scope"] = cfg.lora_scope
    if cfg.pretrained:
        model, tokenizer, meta = load_chat(cfg.pretrained)
        meta = {k: meta[k] for k in ("vision_from", "lm_from", "system", "lora") if k in meta}
        if lora and not meta.get("lora") and cfg.stage == 2:
            model.attach_lora(lora["targets"], lora["rank"], lora["alpha"], lora["scope"])
            meta["lora"] = lora
        return model, tokenizer, meta
    if not cfg.vision_from or not cfg.lm_from:
        raise ConfigError("a chat model needs vision_from (a duomo CLIP) and lm_from (e.g. smollm2)")
    from duomo.io.chat import read_lm
    from duomo.io.resolve import read_model

    clip, _ = read_model(cfg.vision_from)
    lm, _ = read_lm(cfg.lm_from)
    vlm_cfg, system = chat_config(cfg.model, clip.config.vision, lm.config, lm.config.vocab_size)
    del clip, lm
    use_lora = lora if cfg.stage == 2 else None
    model, tokenizer = assemble(vlm_cfg, cfg.vision_from, cfg.lm_from, use_lora)
    meta = {"vision_from": cfg.vision_from, "lm_from": cfg.lm_from, "system": system, "lora": use_lora}
    return model, tokenizer, meta


def trained_parts(cfg: TrainConfig, meta: dict[str, Any]) -> list[str]:
    """What learns in this stage (the rest is frozen)."""
    if cfg.stage == 1:
        return ["projector"]
    if cfg.train_lm:
        return ["projector", "lm"]
    return ["projector", "lora"] if meta.get("lora") else ["projector"]


def conversation_dataset(cfg: TrainConfig, image_size: int) -> Any:
    """The training conversations of `cfg.data`."""
    path = Path(cfg.data).expanduser()
    if path.suffix in (".json", ".jsonl") and path.is_file():
        stats = SkipStats(f"conversations {path.name}")
        conversations = read_conversations(path, stats)
        if stats.count:
            log.warning("%s: %d records skipped", path, stats.count)
        return ConversationDataset(conversations)
    pairs = build_dataset(cfg.data, image_size, cfg.data_size, cfg.data_language)
    return PairConversations(pairs, seed=cfg.seed, describe_only=cfg.stage == 1)


def build_trainer(cfg: TrainConfig, info: DistInfo | None = None) -> Trainer:
    """The `Trainer` of a chat run on this process."""
    info = info or DistInfo(device=resolve_device(cfg.device))
    seed_everything(cfg.seed)
    model, tokenizer, meta = build_chat_model(cfg)
    parts = trained_parts(cfg, meta)
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if "lm" in parts:
        model.lm.requires_grad_(True)
    if "lora" in parts:
        for name, p in model.lm.named_parameters():
            if name.endswith((".lora_a", ".lora_b")):
                p.requires_grad_(True)
    vcfg = model.config.vision
    transform = image_transform(vcfg.image_size, vcfg.mean, vcfg.std, train=False)
    dataset = conversation_dataset(cfg, vcfg.image_size)
    pad = tokenizer.token_id(tokenizer.pad_token) or tokenizer.eos_token_id or 0
    collate = collate_conversations(
        tokenizer, transform, model.config.image_token_id, model.config.tokens_per_image, meta.get("system"),
        min(cfg.max_length, model.config.lm.max_positions), pad,
    )  # fmt: skip
    loaders = map_loader_factory(
        dataset, cfg.batch_size, collate, info.rank, info.world_size, cfg.workers, cfg.seed
    )
    meta = {**meta, "trained": parts, "stage": cfg.stage, "data": cfg.data, "steps": cfg.steps,
            "trained_with": "duomo train --task chat"}  # fmt: skip

    def export(module: torch.nn.Module, out: Any) -> Any:
        return save_chat(module, out / "model", meta)

    frozen = ["vision"] + (["lm"] if parts == ["projector"] else [])  # LoRA trains inside the frozen LM
    trainer = Trainer(
        model, NextTokenObjective(), loaders, cfg, info, freeze=frozen, meta=meta, export=export
    )
    if info.is_main:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "training a chat model (stage %d: %s): %d trainable parameters", cfg.stage, "+".join(parts), n
        )
    return trainer


def train_chat(cfg: TrainConfig, info: DistInfo | None = None) -> dict[str, Any]:
    """Train as `cfg` says, alone or under torchrun; the chat folder is OUT/model."""
    with process_group(cfg.device, info) as joined:
        return build_trainer(cfg, joined).fit()
