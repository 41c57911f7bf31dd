"""Models: ViT, text Transformer, CLIP; configs as data and one factory."""

from duomo.models.clip import CLIP
from duomo.models.clip.config import CLIPConfig, TextConfig, VisionConfig
from duomo.models.clip.text import TextTransformer
from duomo.models.clip.vit import VisionTransformer
from duomo.models.factory import (
    create_model,
    get_model_config,
    list_models,
    model_architecture,
    read_config_json,
    register_text_tower,
)

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "TextTransformer",
    "VisionConfig",
    "VisionTransformer",
    "create_model",
    "get_model_config",
    "list_models",
    "model_architecture",
    "read_config_json",
    "register_text_tower",
]
from duomo.models.clip import minilm  # noqa: E402, F401  (registers the "minilm" text tower)
