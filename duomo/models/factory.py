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
from duomo.models.clip.config import CLIPConfig, TextConfig
from duomo.models.clip.text import TextTransformer
from duomo.models.clip.vit import VisionTransformer

CONFIG_DIR = resources.files("duomo.models") / "configs"

TextTowerBuilder = Callable[[TextConfig, int], nn.Module]
TEXT_TOWERS: dict[str, TextTowerBuilder] = {"transformer": TextTransformer}


def register_text_tower(kind: str, builder: TextTowerBuilder) -> None:
    """Make `TextConfig.kind == kind` build its text tower with `builder(text_config, embed_dim)`."""
    TEXT_TOWERS[kind] = builder


def read_config_json(name: str) -> dict:
    """The raw JSON of a named config (or of a .json path), with a did-you-mean error for unknown names."""
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
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model config {name!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"model config {name!r} must be a JSON object")
    return data


def model_architecture(name: str) -> str:
    """The family a config builds: "clip" (dual encoder, the default) or another, such as "beit3"."""
    return str(read_config_json(name).get("architecture", "clip"))


def list_models(architecture: str | None = None) -> list[str]:
    """Names of the built-in model configs, optionally only those of one architecture ("clip", "beit3")."""
    names = sorted(p.name.removesuffix(".json") for p in CONFIG_DIR.iterdir() if p.name.endswith(".json"))
    if architecture is None:
        return names
    return [n for n in names if model_architecture(n) == architecture]


def get_model_config(name: str) -> CLIPConfig:
    """The config of a named CLIP-style model, or of a JSON config file path."""
    data = read_config_json(name)
    architecture = data.pop("architecture", "clip")
    if architecture != "clip":
        raise ConfigError(
            f"{name!r} is a {architecture} config, not a CLIP dual encoder; "
            f"build it with duomo.models.{architecture} instead"
        )
    return CLIPConfig.from_dict(data)


def build_text_tower(cfg: TextConfig, embed_dim: int) -> nn.Module:
    """Build the text tower registered for `cfg.kind`."""
    if cfg.kind not in TEXT_TOWERS:
        raise ConfigError(f"unknown text tower kind {cfg.kind!r}; known: {sorted(TEXT_TOWERS)}")
    return TEXT_TOWERS[cfg.kind](cfg, embed_dim)


def create_model(config: str | CLIPConfig) -> nn.Module:
    """Build a randomly initialised model from a config name, JSON path or `CLIPConfig` (CLIP or BEiT-3)."""
    if isinstance(config, str) and model_architecture(config) == "beit3":
        from duomo.models.beit3 import create_beit3  # beit3 builds on vit: imported late, no cycle

        return create_beit3(config)
    cfg = config if isinstance(config, CLIPConfig) else get_model_config(config)
    try:
        visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        text = build_text_tower(cfg.text, cfg.embed_dim)
    except ValueError as exc:
        raise ConfigError(f"inconsistent model config: {exc}") from exc
    return CLIP(visual, text, cfg.init_logit_scale, cfg.init_logit_bias, config=cfg)
