"""Models: ViT, text Transformer, CLIP; configs as data and one factory."""

from duomo.models.clip import CLIP
from duomo.models.config import CLIPConfig, TextConfig, VisionConfig
from duomo.models.factory import (
    create_model,
    get_model_config,
    list_models,
    model_architecture,
    read_config_json,
    register_text_tower,
)
from duomo.models.text import TextTransformer
from duomo.models.vit import VisionTransformer

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
from duomo.models import minilm  # noqa: E402, F401  (registers the "minilm" text tower)
