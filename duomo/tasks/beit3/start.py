"""Where a BEiT-3 run starts: a fresh backbone, one whose vision pathway is a duomo CLIP's image tower, or a
pretrained (masked-data-modelling) task folder."""

from __future__ import annotations

from pathlib import Path

from duomo.io.beit3_tasks import load_task
from duomo.io.resolve import provenance, read_model
from duomo.models.beit3 import BEiT3, BEiT3Config, BEiT3ForMDM, create_beit3, get_beit3_config
from duomo.models.beit3.from_clip import beit3_from_clip


def start_backbone(config: str | BEiT3Config = "beit3-tiny", vision_init: str | None = None) -> BEiT3:
    """A fresh BEiT-3 of `config`, or, with `vision_init` (a duomo model name or folder, e.g.
    "shapes-minilm"), one whose vision pathway is that CLIP's image tower and whose text side follows
    `config`. Record `provenance(vision_init)` in the task folder that results."""
    if vision_init is None:
        return create_beit3(config)
    base = config if isinstance(config, BEiT3Config) else get_beit3_config(config)
    clip, _ = read_model(str(vision_init))
    return beit3_from_clip(clip, base)


def load_pretrained(path: str | Path) -> tuple[BEiT3ForMDM, str | None]:
    """A pretrained folder (`duomo beit3-train pretrain`) and the CLIP its vision pathway came from."""
    model, config = load_task(path, "mdm")
    return model, config.get("vision_init")


__all__ = ["load_pretrained", "provenance", "start_backbone"]
