"""Named configs (one JSON file each) and the one factory that builds a CLIP model from a config."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from torch import nn

from duomo.errors import ConfigError, UnknownModelError
from duomo.models.clip import CLIP
from duomo.models.config import CLIPConfig, TextConfig
from duomo.models.text import TextTransformer
from duomo.models.vit import VisionTransformer

CONFIG_DIR = resources.files("duomo.models") / "configs"

TextTowerBuilder = Callable[[TextConfig, int], nn.Module]
TEXT_TOWERS: dict[str, TextTowerBuilder] = {"transformer": TextTransformer}


def register_text_tower(kind: str, builder: TextTowerBuilder) -> None:
    """Make `TextConfig.kind == kind` build its text tower with `builder(text_config, embed_dim)`."""
    TEXT_TOWERS[kind] = builder


def list_models() -> list[str]:
    """Names of the built-in model configs."""
    return sorted(p.name.removesuffix(".json") for p in CONFIG_DIR.iterdir() if p.name.endswith(".json"))


def get_model_config(name: str) -> CLIPConfig:
    """The config of a named model, or of a JSON config file path."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
    else:
        entry = CONFIG_DIR / f"{name}.json"
        if not entry.is_file():
            close = difflib.get_close_matches(name, list_models(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UnknownModelError(f"unknown model {name!r}.{hint} See `duomo models` for the list.")
        text = entry.read_text()
    try:
        return CLIPConfig.from_dict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model config {name!r} is not valid JSON: {exc}") from exc


def build_text_tower(cfg: TextConfig, embed_dim: int) -> nn.Module:
    """Build the text tower registered for `cfg.kind`."""
    if cfg.kind not in TEXT_TOWERS:
        raise ConfigError(f"unknown text tower kind {cfg.kind!r}; known: {sorted(TEXT_TOWERS)}")
    return TEXT_TOWERS[cfg.kind](cfg, embed_dim)


def create_model(config: str | CLIPConfig) -> CLIP:
    """Build a randomly initialised CLIP from a config name, JSON path or `CLIPConfig`."""
    cfg = config if isinstance(config, CLIPConfig) else get_model_config(config)
    try:
        visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        text = build_text_tower(cfg.text, cfg.embed_dim)
    except ValueError as exc:
        raise ConfigError(f"inconsistent model config: {exc}") from exc
    return CLIP(visual, text, cfg.init_logit_scale, cfg.init_logit_bias, config=cfg)
